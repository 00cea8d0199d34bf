"""Running as a Unix daemon: the command line, lifecycle, Unix plumbing (fork, pidfile, syslog,
privileges), listeners, signals and systemd notification.

Imports `api`, `engine` and `config`, never `tools`.
"""
