/* error.h - internal: the one way engine functions write an error message for the caller.
 *
 * Every public function that can fail takes (char *err, size_t errlen); a message goes there
 * NUL-terminated, cut to fit. A NULL buffer or errlen 0 means the caller wants no message.
 */
#ifndef BITNET_ERROR_H
#define BITNET_ERROR_H

#include <stdarg.h>
#include <stddef.h>

/* printf-style message into err[0..errlen) (nothing when err is NULL or errlen is 0). */
void bn_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The same with a va_list, for helpers that add context around the caller's message. */
void bn_vset_err(char *err, size_t errlen, const char *fmt, va_list ap)
    __attribute__((format(printf, 3, 0)));

#endif
