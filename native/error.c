/* error.c - bn_set_err / bn_vset_err, the single formatter of the engine's error messages
 * (see error.h). */
#include "error.h"

#include <stdio.h>

void bn_vset_err(char *err, size_t errlen, const char *fmt, va_list ap)
{
    if (!err || errlen == 0)
        return;
    vsnprintf(err, errlen, fmt, ap);
}

void bn_set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    bn_vset_err(err, errlen, fmt, ap);
    va_end(ap);
}
