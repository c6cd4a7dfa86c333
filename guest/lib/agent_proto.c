/* Line protocol helpers of tb-rpal_agent / tb-rpal_svc; see agent_proto.h. */
#define _GNU_SOURCE
#include "agent_proto.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int ap_parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	int base = 10, any = 0;

	if (!s || !*s)
		return -1;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (; *s; s++) {
		int d;

		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			return -1;
		if (v > (UINT64_MAX - (uint64_t)d) / (uint64_t)base)
			return -1;	/* overflow */
		v = v * (uint64_t)base + (uint64_t)d;
		any = 1;
	}
	if (!any)
		return -1;
	*out = v;
	return 0;
}

int ap_parse_i64(const char *s, int64_t *out)
{
	uint64_t v;

	if (!s)
		return -1;
	if (*s == '-') {
		if (ap_parse_u64(s + 1, &v) || v > (uint64_t)INT64_MAX + 1)
			return -1;
		*out = (int64_t)(0 - v);
		return 0;
	}
	if (ap_parse_u64(s, &v) || v > (uint64_t)INT64_MAX)
		return -1;
	*out = (int64_t)v;
	return 0;
}

int ap_name_ok(const char *s, size_t maxlen)
{
	size_t n = 0;

	if (!s || !*s)
		return 0;
	for (; *s; s++, n++)
		if (n >= maxlen || !((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
			return 0;
	return 1;
}

static int is_sep(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\r';
}

const char *ap_parse(char *line, struct ap_cmd *c)
{
	char *tok[AP_MAX_ARGS + 2];
	int n = 0, i;
	char *p = line;

	memset(c, 0, sizeof(*c));
	while (*p) {
		while (is_sep(*p))
			*p++ = 0;
		if (!*p)
			break;
		if (n == AP_MAX_ARGS + 2)
			return "arg";
		tok[n++] = p;
		while (*p && !is_sep(*p))
			p++;
	}
	if (n < 1 || ap_parse_u64(tok[0], &c->seq) || c->seq == 0 || c->seq > (uint64_t)INT64_MAX)
		return "seq";
	if (n < 2 || !ap_name_ok(tok[1], 32))
		return "op";
	c->op = tok[1];
	for (i = 2; i < n; i++) {
		char *eq = strchr(tok[i], '=');

		if (!eq || eq == tok[i])
			return "arg";
		*eq = 0;
		if (!ap_name_ok(tok[i], 32))
			return "arg";
		c->key[c->nargs] = tok[i];
		c->val[c->nargs] = eq + 1;
		c->nargs++;
	}
	return NULL;
}

const char *ap_get(const struct ap_cmd *c, const char *key)
{
	int i;

	for (i = 0; i < c->nargs; i++)
		if (!strcmp(c->key[i], key))
			return c->val[i];
	return NULL;
}

int ap_u64(const struct ap_cmd *c, const char *key, uint64_t dflt, uint64_t *out)
{
	const char *v = ap_get(c, key);

	*out = dflt;
	if (!v)
		return 0;
	return ap_parse_u64(v, out) ? -1 : 1;
}

int ap_i64(const struct ap_cmd *c, const char *key, int64_t dflt, int64_t *out)
{
	const char *v = ap_get(c, key);

	*out = dflt;
	if (!v)
		return 0;
	return ap_parse_i64(v, out) ? -1 : 1;
}

void ap_begin(struct ap_ans *a, uint64_t seq, const char *status)
{
	a->len = 0;
	a->overflow = 0;
	ap_add(a, "%llu %s", (unsigned long long)seq, status);
}

void ap_event(struct ap_ans *a, const char *event)
{
	a->len = 0;
	a->overflow = 0;
	ap_add(a, "* %s", event);
}

void ap_add(struct ap_ans *a, const char *fmt, ...)
{
	va_list ap;
	size_t room = sizeof(a->buf) - 1 - a->len;	/* keep one byte for '\n' */
	int n;

	if (a->overflow)
		return;
	if (a->len && room > 1) {
		a->buf[a->len++] = ' ';
		room--;
	}
	va_start(ap, fmt);
	n = vsnprintf(a->buf + a->len, room, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= room) {
		a->overflow = 1;
		a->buf[a->len] = 0;
		return;
	}
	a->len += (size_t)n;
}

const char *ap_errname(int err)
{
	const char *s = strerrorname_np(err);
	static __thread char buf[16];

	if (s)
		return s;
	snprintf(buf, sizeof(buf), "E%d", err);
	return buf;
}

void ap_err(struct ap_ans *a, uint64_t seq, int err)
{
	ap_begin(a, seq, "err");
	ap_add(a, "errno=%d name=%s", err, ap_errname(err));
}

void ap_bad(struct ap_ans *a, uint64_t seq, const char *reason)
{
	ap_begin(a, seq, "bad");
	ap_add(a, "reason=%s", reason);
}

size_t ap_end(struct ap_ans *a)
{
	if (a->len > sizeof(a->buf) - 1)
		a->len = sizeof(a->buf) - 1;
	a->buf[a->len++] = '\n';
	return a->len;
}

int ap_next_line(struct ap_reader *r, char *line)
{
	for (;;) {
		char *nl = memchr(r->buf, '\n', r->len);

		if (!nl) {
			if (r->len >= AP_LINE_MAX) {	/* too long: drop what we have */
				r->len = 0;
				r->discarding = 1;
			}
			return 0;
		}
		size_t n = (size_t)(nl - r->buf);
		int was_discarding = r->discarding;

		r->discarding = 0;
		if (!was_discarding && n < AP_LINE_MAX) {
			memcpy(line, r->buf, n);
			line[n] = 0;
		}
		memmove(r->buf, nl + 1, r->len - n - 1);
		r->len -= n + 1;
		if (was_discarding || n >= AP_LINE_MAX)
			return -2;
		/* NUL bytes inside a line make it garbage, not shorter */
		if (memchr(line, 0, n) != NULL && strlen(line) != n)
			return -2;
		return 1;
	}
}

int ap_fill(struct ap_reader *r)
{
	ssize_t n;

	if (r->len >= sizeof(r->buf))
		r->len = 0;
	n = read(r->fd, r->buf + r->len, sizeof(r->buf) - r->len);
	if (n < 0)
		return -errno;
	r->len += (size_t)n;
	return (int)n;
}

int ap_write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}
