/*
 * Line protocol helpers shared by tb-rpal_agent and tb-rpal_svc
 * (guest/AGENT-PROTOCOL.md): parse "<seq> <op> [key=value ...]", build answers.
 * Everything that arrives is untrusted: the parser never writes outside its buffers.
 */
#ifndef TB_AGENT_PROTO_H
#define TB_AGENT_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define AP_LINE_MAX	4096
#define AP_MAX_ARGS	32

struct ap_cmd {
	uint64_t seq;
	const char *op;
	int nargs;
	const char *key[AP_MAX_ARGS];
	const char *val[AP_MAX_ARGS];
};

/* Splits @line in place (NUL-terminated, no newline). Returns NULL or a reason word. */
const char *ap_parse(char *line, struct ap_cmd *c);
const char *ap_get(const struct ap_cmd *c, const char *key);
/* 0: absent (*out = dflt), 1: parsed, -1: present but not a number */
int ap_u64(const struct ap_cmd *c, const char *key, uint64_t dflt, uint64_t *out);
int ap_i64(const struct ap_cmd *c, const char *key, int64_t dflt, int64_t *out);
int ap_parse_u64(const char *s, uint64_t *out);
int ap_parse_i64(const char *s, int64_t *out);
int ap_name_ok(const char *s, size_t maxlen);	/* [a-z0-9_]{1,maxlen} */

struct ap_ans {
	char buf[AP_LINE_MAX];
	size_t len;
	int overflow;
};

void ap_begin(struct ap_ans *a, uint64_t seq, const char *status);
void ap_event(struct ap_ans *a, const char *event);
void ap_add(struct ap_ans *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void ap_err(struct ap_ans *a, uint64_t seq, int err);	/* err > 0: errno */
void ap_bad(struct ap_ans *a, uint64_t seq, const char *reason);
/* Terminates with '\n'; returns the line length. */
size_t ap_end(struct ap_ans *a);
const char *ap_errname(int err);

/* Buffered line reader over a file descriptor. */
struct ap_reader {
	int fd;
	char buf[2 * AP_LINE_MAX];
	size_t len;
	int discarding;
};
/*
 * Returns 1 with a NUL-terminated line in @line (no '\n'), 0 if no complete line is
 * buffered (call ap_fill), -2 for a line that was too long (discarded).
 */
int ap_next_line(struct ap_reader *r, char *line);
/* read() once: >0 bytes read, 0 EOF, -errno */
int ap_fill(struct ap_reader *r);
int ap_write_all(int fd, const char *buf, size_t len);

#endif
