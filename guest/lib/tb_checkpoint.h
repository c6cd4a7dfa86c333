/*
 * Checkpoints: a guest program stops and lets the host snapshot the guest.
 *
 * tb_checkpoint(name) blocks until the host has taken its snapshot named
 * `name` (or has no snapshot to take), then returns 0; -1 with errno set when
 * there is no checkpoint channel or the host refused (the host's reason is
 * printed on stderr). The calling thread is asleep in read() while the host
 * looks, so its registers, PKRU included, are saved in its task_struct.
 *
 * Both are async-signal-safe (only system calls, no stdio or malloc): a
 * signal handler may take a checkpoint, and the host then sees the PKRU the
 * thread has in the handler.  They set errno on failure, so a handler saves
 * and restores errno around them.  A signal that interrupts a checkpoint of
 * the same process must not take one itself: the second flock() would wait
 * for the first forever.
 */
#ifndef TB_CHECKPOINT_H
#define TB_CHECKPOINT_H

#define TB_CHECKPOINT_PORT "org.testbed.checkpoint"
/* the serial line of recorded runs (images/initramfs/rcS.j2 links it) */
#define TB_CHECKPOINT_SERIAL "/dev/tb-checkpoint"

int tb_checkpoint(const char *name);

/*
 * The same, with facts for the host's checks: `facts` is "key=value ..."
 * (no newlines; keys and values without spaces), e.g. "rpal_id=3 pkey=4",
 * written into the snapshot's trigger. NULL or "" for none.
 */
int tb_checkpoint_facts(const char *name, const char *facts);

#endif
