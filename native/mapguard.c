/* mapguard.c - a model file changed under its mapping ends the process with one clear line.
 *
 * The engine reads weights in place from a read-only mapping of the model file. When that
 * file is overwritten or truncated in place (`cp new.gguf model.gguf`), the next read of a
 * page past the new end raises SIGBUS, which would kill the daemon by signal without a word.
 * A SIGBUS whose address lies in a registered mapping instead writes one line naming the file
 * to standard error (and to one more descriptor the daemon may give: its log file or a
 * syslog socket) and exits with BN_MAPGUARD_EXIT, so the service manager restarts the daemon
 * with whatever the file now holds. Any other SIGBUS goes to the handler that was there before
 * (Python's faulthandler, or the default action).
 *
 * Only async-signal-safe calls are made in the handler: write(2) and _exit(2). The table of
 * mappings is fixed-size and every field is an atomic, so the handler never sees a half-written
 * entry.
 */
#define _XOPEN_SOURCE 700
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "mapguard.h"

#define MAX_GUARDED 16
#define PATH_CHARS 512

typedef struct {
    _Atomic uintptr_t base; /* 0: free entry */
    _Atomic uintptr_t size;
    char path[PATH_CHARS]; /* written before base is published */
} guarded_map;

static guarded_map g_maps[MAX_GUARDED];
static _Atomic int g_extra_fd = -1;
static char g_prefix[64]; /* e.g. "<26>bitnetd[1234]: " for syslog; written before the fd */
static _Atomic int g_installed;
static struct sigaction g_previous;

static size_t text_length(const char *s, size_t limit)
{
    size_t n = 0;
    while (n < limit && s[n])
        n++;
    return n;
}

/* Append at most s_max characters of s (up to its NUL) to buf[at..cap). */
static size_t append(char *buf, size_t at, size_t cap, const char *s, size_t s_max)
{
    size_t n = text_length(s, s_max);
    if (n > cap - at)
        n = cap - at;
    memcpy(buf + at, s, n);
    return at + n;
}

#define APPEND_TEXT(buf, at, cap, literal) append(buf, at, cap, literal, sizeof literal)

static size_t append_u64(char *buf, size_t at, size_t cap, uint64_t v)
{
    char digits[21];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && at < cap)
        buf[at++] = digits[--n];
    return at;
}

static void write_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w <= 0)
            return;
        buf += w;
        n -= (size_t)w;
    }
}

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    for (int i = 0; i < MAX_GUARDED; i++) {
        uintptr_t base = atomic_load(&g_maps[i].base);
        uintptr_t size = atomic_load(&g_maps[i].size);
        if (base == 0 || addr < base || addr - base >= size)
            continue;
        char line[PATH_CHARS + 320];
        size_t n = 0, cap = sizeof line - 1;
        n = APPEND_TEXT(line, n, cap, "bitnetd: the model file ");
        n = append(line, n, cap, g_maps[i].path, PATH_CHARS);
        n = APPEND_TEXT(line, n, cap, " changed or shrank under the running daemon (read at byte ");
        n = append_u64(line, n, cap, (uint64_t)(addr - base));
        n = APPEND_TEXT(line, n, cap, " of the ");
        n = append_u64(line, n, cap, (uint64_t)size);
        n = APPEND_TEXT(line, n, cap,
                        " it had); exiting so that it is restarted. Replace model files by "
                        "renaming a new file over the old one, then reload.\n");
        write_all(2, line, n);
        int extra = atomic_load(&g_extra_fd);
        if (extra >= 0) {
            char with_prefix[sizeof g_prefix + sizeof line];
            size_t m = append(with_prefix, 0, sizeof with_prefix, g_prefix, sizeof g_prefix);
            size_t skip = sizeof "bitnetd: " - 1; /* the prefix names the program there */
            memcpy(with_prefix + m, line + skip, n - skip);
            write_all(extra, with_prefix, m + n - skip);
        }
        _exit(BN_MAPGUARD_EXIT);
    }
    /* Not ours: hand it to whoever handled SIGBUS before. */
    if (g_previous.sa_flags & SA_SIGINFO) {
        if (g_previous.sa_sigaction)
            g_previous.sa_sigaction(sig, info, context);
        return;
    }
    if (g_previous.sa_handler == SIG_IGN)
        return;
    if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler) {
        g_previous.sa_handler(sig);
        return;
    }
    /* Default action: restore it; returning re-runs the faulting access, which now kills. */
    signal(SIGBUS, SIG_DFL);
}

static int install_once(void)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(&g_installed, &expected, 1))
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &g_previous) != 0) {
        atomic_store(&g_installed, 0);
        return -1;
    }
    return 0;
}

int bn_mapguard_add(const void *base, size_t size, const char *path)
{
    if (!base || size == 0 || install_once() != 0)
        return -1;
    for (int i = 0; i < MAX_GUARDED; i++) {
        uintptr_t expected = 0;
        /* Claim the entry with a placeholder first, so no one else fills it meanwhile. */
        if (!atomic_compare_exchange_strong(&g_maps[i].base, &expected, (uintptr_t)1))
            continue;
        size_t n = text_length(path ? path : "?", PATH_CHARS - 1);
        memcpy(g_maps[i].path, path ? path : "?", n);
        g_maps[i].path[n] = '\0';
        atomic_store(&g_maps[i].size, (uintptr_t)size);
        atomic_store(&g_maps[i].base, (uintptr_t)base);
        return 0;
    }
    return -1; /* table full: the mapping works, it is just not guarded */
}

void bn_mapguard_remove(const void *base)
{
    for (int i = 0; i < MAX_GUARDED; i++) {
        if (atomic_load(&g_maps[i].base) == (uintptr_t)base) {
            atomic_store(&g_maps[i].size, 0);
            atomic_store(&g_maps[i].base, 0);
            return;
        }
    }
}

void bn_set_fatal_log(int fd, const char *prefix)
{
    atomic_store(&g_extra_fd, -1); /* never let the handler read a half-written prefix */
    size_t n = text_length(prefix ? prefix : "", sizeof g_prefix - 1);
    memcpy(g_prefix, prefix ? prefix : "", n);
    g_prefix[n] = '\0';
    atomic_store(&g_extra_fd, fd);
}
