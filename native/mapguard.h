/* mapguard.h - internal: report a model file changed under its mapping (SIGBUS) clearly. */
#ifndef BITNET_MAPGUARD_H
#define BITNET_MAPGUARD_H

#include <stddef.h>

#include "bitnet.h"

/* Watch [base, base+size), a mapping of the file at `path`: a SIGBUS there ends the process
 * with one line naming the file and exit status BN_MAPGUARD_EXIT. 0, or -1 when it cannot
 * be watched (the mapping still works). */
int bn_mapguard_add(const void *base, size_t size, const char *path);
/* Stop watching the mapping at `base` (before it is unmapped). */
void bn_mapguard_remove(const void *base);

#endif
