"""The daemon's life around the ASGI app: start-up, readiness, signals, reload, drain, exit.

    pidfile -> logging -> sockets (bound, or inherited from systemd) -> [daemonize]
    -> Trio: signals; hypercorn serve (lifespan loads the model, then listen())
       -> privilege drop -> READY=1 -> watchdog ... SIGHUP: reload ... SIGTERM: drain
    -> remove the unix socket and the pidfile

cli.py parses the command line and calls `run()` (serve) or `check()` (-t). The app is used
through a few methods: load_engine / use_engine / retire_engine for the model swap on reload,
and begin_drain for a clean end of running generations on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bitnetd_trio import __version__
from bitnetd_trio.config import Config, ConfigError, load_config
from bitnetd_trio.daemon.http_server import hypercorn_config, serve
from bitnetd_trio.daemon.listeners import (
    Listener,
    adopt_inherited,
    close_listeners,
    open_listeners,
    parse_listen_address,
)
from bitnetd_trio.daemon.sdnotify import (
    Notifier,
    ProgressWatch,
    listen_fds,
    run_watchdog,
    watchdog_interval,
)
from bitnetd_trio.daemon.signals import SignalActions, serve_signals
from bitnetd_trio.daemon.unix import (
    DaemonError,
    LogSetup,
    PidFile,
    ReconnectingSysLogHandler,
    StartupReport,
    daemonize,
    drop_privileges,
    resolve_credentials,
    setup_logging,
)

__all__ = ["Daemon", "check", "run"]

log = logging.getLogger("bitnetd")

#: While the model loads, systemd's start timeout is pushed out by this much, every third of it.
LOAD_EXTEND_SECONDS = 30.0
#: hypercorn cancels connections this long after the drain deadline: the app ends them first.
HYPERCORN_GRACE_MARGIN = 5.0


def _engine_settings_key(cfg: Config) -> tuple[Any, ...]:
    """The settings that need a new inference thread (a new model) when they change."""
    m = cfg.model
    return (m.path, m.threads, m.ctx_size, m.parallel, m.chat_template, cfg.server.max_queue)


def _restart_only_key(cfg: Config) -> tuple[Any, ...]:
    s, d = cfg.server, cfg.daemon
    return (
        tuple(s.listen),
        s.unix_socket,
        s.unix_socket_mode,
        s.unix_socket_owner,
        s.backlog,
        d.pidfile,
        d.user,
        d.group,
        d.logfile,
    )


class Daemon:
    """One run of the daemon (foreground or detached)."""

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        *,
        foreground: bool,
        verbose: bool = False,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.foreground = foreground
        self.verbose = verbose
        self.notifier = Notifier(unset_environment=True)
        self.pidfile: PidFile | None = None
        self.logs: LogSetup | None = None
        self.listeners: list[Listener] = []
        self.report = StartupReport(None)
        self.app: Any = None
        self.started_at = time.time()
        self.serving = False
        self.draining = False
        self.exit_code = 0
        self._shutdown: trio.Event | None = None  # created inside trio.run
        self._startup_scope: trio.CancelScope | None = None
        self._watchdog_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._delayed_drain: trio.CancelScope | None = None  # [server] drain_delay running
        self._where = ""

    # ---- before Trio ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Pidfile, logging, sockets: everything that can fail with a message for the terminal."""
        cfg = self.config
        inherited = listen_fds()  # before any fork: LISTEN_PID names this process
        if cfg.daemon.pidfile:
            self.pidfile = PidFile(cfg.daemon.pidfile)
            self.pidfile.acquire()
        level: str | int = logging.DEBUG if self.verbose else cfg.daemon.loglevel
        self.logs = setup_logging(
            level=level, logfile=cfg.daemon.logfile, foreground=self.foreground
        )
        if inherited:
            self.listeners = adopt_inherited(inherited)
            log.info(
                "socket activation: using %d inherited socket(s) instead of [server] listen",
                len(inherited),
            )
        else:
            owner = cfg.server.unix_socket_owner
            if not owner and cfg.daemon.user and os.geteuid() == 0:
                owner = cfg.daemon.user + (f":{cfg.daemon.group}" if cfg.daemon.group else "")
            self.listeners = open_listeners(
                cfg.server.listen,
                cfg.server.unix_socket,
                unix_socket_mode=cfg.server.unix_socket_mode,
                unix_socket_owner=owner,
            )
        self._where = ", ".join(li.description for li in self.listeners)

    def detach(self) -> None:
        self.report = daemonize()
        pid = os.getpid()
        if self.pidfile is not None:
            self.pidfile.write(pid)
        for handler in self.logs.handlers if self.logs else []:
            if isinstance(handler, ReconnectingSysLogHandler):
                handler.set_pid(pid)

    def cleanup(self) -> None:
        close_listeners(self.listeners)
        if self.pidfile is not None:
            self.pidfile.release()
        self.notifier.close()

    # ---- Trio -------------------------------------------------------------------------------

    def hypercorn_config(self, binds: Sequence[str]) -> Any:
        hc = hypercorn_config(self.config, binds)
        hc.graceful_timeout = self.config.server.drain_timeout + HYPERCORN_GRACE_MARGIN
        hc.startup_timeout = 3600.0
        # hypercorn's own messages go through our handlers (syslog, file) instead of stderr.
        hc.errorlog = logging.getLogger("hypercorn.error")
        hc.accesslog = None
        return hc

    async def main(self) -> int:
        self._shutdown = trio.Event()
        # Imported after the fork: importing it starts nothing, but it loads numpy and the engine.
        from bitnetd_trio.api.asgi import create_app

        self._hand_fatal_log_to_engine()
        self.app = create_app(self.config)
        binds = [li.hypercorn_bind() for li in self.listeners]
        hc = self.hypercorn_config(binds)
        actions = SignalActions(
            reload=self.reload,
            terminate=self.terminate,
            reopen_logs=self.reopen_logs,
            log_status=self.log_status,
        )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(serve_signals, actions)
            model = self.config.model.path or "the demo model"
            self.notifier.status(f"loading {model}")
            log.info("bitnetd %s starting (pid %d): loading %s", __version__, os.getpid(), model)
            loading = trio.CancelScope()
            nursery.start_soon(self._extend_while_loading, loading)
            self._startup_scope = trio.CancelScope()
            try:
                with self._startup_scope:
                    async with trio.open_nursery() as server_nursery:
                        await server_nursery.start(
                            lambda task_status: serve(
                                self.app,
                                hc,
                                shutdown_trigger=self._shutdown.wait,
                                task_status=task_status,
                            )
                        )
                        loading.cancel()
                        self._on_serving()
                if self._startup_scope.cancelled_caught and not self.serving:
                    log.info("stopped during start-up")
                    self.report.fail("stopped by a signal during start-up")
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | trio.Cancelled):
                    raise
                message = _describe(exc)
                if self.serving:
                    log.error("bitnetd stopped: %s", message, exc_info=exc)
                else:
                    log.error("start-up failed: %s", message)
                    self.report.fail(message)
                self.exit_code = 1
            finally:
                loading.cancel()
                if not self.draining:
                    self.notifier.stopping("stopping")
                nursery.cancel_scope.cancel()
        if self.exit_code == 0:
            log.info("bitnetd stopped")
        return self.exit_code

    async def _extend_while_loading(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                self.notifier.extend_timeout(LOAD_EXTEND_SECONDS)
                await trio.sleep(LOAD_EXTEND_SECONDS / 3)

    def _on_serving(self) -> None:
        """Model loaded, sockets listening: drop privileges, then tell systemd and the launcher."""
        cfg = self.config
        if cfg.daemon.user or cfg.daemon.group:
            creds = resolve_credentials(cfg.daemon.user, cfg.daemon.group)
            if os.geteuid() == 0 and creds.uid is not None and self.logs is not None:
                self.logs.chown_files(creds.uid, creds.gid if creds.gid is not None else -1)
            log.info("%s", drop_privileges(creds))  # DaemonError: never go on as root
        self.serving = True
        status = self._serving_status()
        log.info("%s", status)
        self.notifier.ready(status, mainpid=None if self.foreground else os.getpid())
        self.report.ok()
        interval = watchdog_interval()
        if interval is not None and self._nursery is not None:
            self._watchdog_scope = trio.CancelScope()
            self._nursery.start_soon(self._watchdog, interval, self._watchdog_scope)

    def _serving_status(self) -> str:
        model = getattr(self.app, "model_id", "") or "?"
        return f"serving {model} on {self._where}"

    async def _watchdog(self, interval: float, scope: trio.CancelScope) -> None:
        # A stall longer than the whole watchdog period (2 * interval) stops the pings.
        watch = ProgressWatch(self._engine_progress, stall_after=2 * interval)
        last_reason = [""]

        def unhealthy() -> None:
            if watch.reason != last_reason[0]:
                log.error("watchdog: not pinging systemd: %s", watch.reason)
                last_reason[0] = watch.reason

        with scope:
            await run_watchdog(self.notifier, interval, watch.healthy, unhealthy)

    def _engine_progress(self) -> tuple[bool, bool, int]:
        engine = self.app.engine if self.app is not None else None
        if engine is None:
            return False, False, 0
        heartbeat = getattr(engine, "heartbeat", None)
        if heartbeat is not None:
            return heartbeat()
        thread = getattr(engine, "_thread", None)
        alive = bool(engine.ready and thread is not None and thread.is_alive())
        return alive, engine.in_system > 0, 0

    # ---- signal actions ---------------------------------------------------------------------

    def terminate(self, signum: int, count: int) -> None:
        if not self.serving:
            if self._startup_scope is not None:
                self._startup_scope.cancel()
            return
        delay = self.config.server.drain_delay
        if count == 1 and delay > 0 and self._nursery is not None:
            # Readiness first: /health answers 503 while the listener still takes requests,
            # so load balancers stop sending work before any connection is refused.
            self.draining = True
            self.app.announce_stop()
            self.notifier.stopping(f"not ready; draining in {delay:g} s")
            self.notifier.extend_timeout(
                delay + self.config.server.drain_timeout + 2 * HYPERCORN_GRACE_MARGIN
            )
            log.info("stopping: /health answers 503; the listener closes in %g s", delay)
            self._delayed_drain = trio.CancelScope()
            self._nursery.start_soon(self._drain_after, delay, self._delayed_drain)
            return
        if self._delayed_drain is not None:  # a second signal during the delay: drain now
            self._delayed_drain.cancel()
            self._delayed_drain = None
            count = 1
        self._drain(count)

    async def _drain_after(self, delay: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(delay)
            self._delayed_drain = None  # from here on, a further signal is a second one
            self._drain(1)

    def _drain(self, count: int) -> None:
        now = trio.current_time()
        if count == 1:
            self.draining = True
            drain = self.config.server.drain_timeout
            running = self._gauge("bitnetd_requests_running") + self._gauge(
                "bitnetd_requests_waiting"
            )
            self.notifier.stopping(f"draining: {running:g} requests, at most {drain:g} s")
            self.notifier.extend_timeout(drain + 2 * HYPERCORN_GRACE_MARGIN)
            if self._watchdog_scope is not None:
                self._watchdog_scope.cancel()
            log.info("draining: no new connections; running generations get %g s", drain)
            self._begin_drain(now + drain)
            assert self._shutdown is not None
            self._shutdown.set()
        else:
            log.warning("second stop signal: ending the remaining generations now")
            self._begin_drain(now)

    def _begin_drain(self, deadline: float) -> None:
        begin = getattr(self.app, "begin_drain", None)
        if begin is not None:
            begin(deadline)

    async def reload(self) -> None:
        if self.draining or not self.serving:
            log.info("reload ignored: %s", "draining" if self.draining else "still starting")
            return
        self.notifier.reloading("reloading the configuration")
        try:
            await self._reload()
        finally:
            self.notifier.ready(self._serving_status())

    async def _reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload: %s", problem)
            log.error("reload: configuration rejected; still serving with the previous one")
            return
        except OSError as exc:
            log.error(
                "reload: cannot read %s: %s; still serving with the previous configuration",
                self.config_path,
                exc.strerror,
            )
            return
        old = self.config
        if _restart_only_key(new) != _restart_only_key(old):
            log.warning(
                "reload: changes to listen, unix_socket*, backlog, pidfile, user, group or "
                "logfile take effect at the next restart"
            )
        if _engine_settings_key(new) != _engine_settings_key(old):
            model = new.model.path or "the demo model"
            self.notifier.status(f"reloading: loading {model}")
            log.info("reload: loading %s beside the current model", model)
            try:
                engine = await self.app.load_engine(new)
            except Exception as exc:  # noqa: BLE001 - a bad model must not stop the server
                log.error(
                    "reload: the new model failed to load (%s); still serving %s",
                    _describe(exc),
                    getattr(self.app, "model_id", "the old model"),
                )
                return
            if self.draining:
                await self.app.retire_engine(engine, grace=0.0).wait()
                return
            previous = self.app.engine
            self.app.use_engine(engine, new)
            log.info(
                "reload: now serving %s; the previous model is freed after its last request",
                self.app.model_id,
            )
            if previous is not None and previous is not engine:
                self.app.retire_engine(previous)
        else:
            self.app.use_engine(self.app.engine, new)
            log.info("reload: configuration applied (same model)")
        self.config = new
        self._apply_log_level(new)

    def _apply_log_level(self, cfg: Config) -> None:
        if self.verbose or self.logs is None:
            return
        level = cfg.daemon.loglevel_number
        logging.getLogger().setLevel(level)
        for handler in self.logs.handlers:
            handler.setLevel(level)

    def _hand_fatal_log_to_engine(self) -> None:
        """The engine's map guard writes its one line from a signal handler: give it the log
        file's or syslog's descriptor (they change when logs are reopened)."""
        from bitnetd_trio.engine.model_file import set_fatal_log

        target = self.logs.fatal_log_target() if self.logs is not None else None
        set_fatal_log(*(target or (-1, "")))

    def reopen_logs(self) -> None:
        if self.logs is None:
            return
        errors = self.logs.reopen()
        self._hand_fatal_log_to_engine()
        for message in errors:
            log.error("SIGUSR1: %s", message)
        if not errors:
            log.info("SIGUSR1: log files reopened")

    def _gauge(self, name: str, labels: dict[str, str] | None = None) -> float:
        metrics = getattr(self.app, "metrics", None)
        if metrics is None:
            return 0.0
        return metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def _counter_total(self, name: str) -> float:
        metrics = getattr(self.app, "metrics", None)
        if metrics is None:
            return 0.0
        total = 0.0
        for family in metrics.registry.collect():
            for sample in family.samples:
                if sample.name == name:
                    total += sample.value
        return total

    def status_line(self) -> str:
        uptime = _format_duration(time.time() - self.started_at)
        engine = self.app.engine if self.app is not None else None
        model = getattr(self.app, "model_id", "") or "none"
        path = getattr(engine, "settings", None)
        path = getattr(path, "model_path", "") if path is not None else ""
        state = "draining" if self.draining else ("serving" if self.serving else "starting")
        return (
            f"status: {state}, pid {os.getpid()}, up {uptime}, model {model}"
            + (f" ({path})" if path else "")
            + f", {self._gauge('bitnetd_active_connections'):g} connections"
            + f", {self._gauge('bitnetd_requests_running'):g} running"
            + f", {self._gauge('bitnetd_requests_waiting'):g} waiting"
            + f", {self._counter_total('bitnetd_requests_total'):g} HTTP requests answered"
            + f", {self._counter_total('bitnetd_tokens_generated_total'):g} tokens generated"
            + (f", {self.app.retiring} old model(s) finishing" if self.app.retiring else "")
        )

    def log_status(self) -> None:
        # At least INFO, and never filtered out by a quieter loglevel: the operator asked for it.
        level = max(logging.INFO, logging.getLogger().getEffectiveLevel())
        log.log(level, "%s", self.status_line())


def _describe(exc: BaseException) -> str:
    """A one-line reason from an exception (or the first one in a group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


def _format_duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if h or d else "") + f"{m}m{s}s"


def run(
    config: Config,
    config_path: str | None,
    *,
    foreground: bool,
    verbose: bool = False,
) -> int:
    """Serve until stopped; the exit status. `config_path` is re-read on SIGHUP."""
    daemon = Daemon(config, config_path, foreground=foreground, verbose=verbose)
    try:
        daemon.prepare()
    except DaemonError as exc:
        print(f"bitnetd: {exc}", file=sys.stderr)
        daemon.cleanup()
        return 1
    try:
        if not foreground:
            daemon.detach()
        return trio.run(daemon.main)
    except DaemonError as exc:
        log.error("%s", exc)
        daemon.report.fail(str(exc))
        return 1
    finally:
        daemon.cleanup()


def check(config_path: str | None) -> int:
    """`bitnetd -t`: the configuration, then the model file; every problem printed; 0 if fine."""
    problems: list[str] = []
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"bitnetd: {problem}", file=sys.stderr)
        return 2
    source = config.source_path or "built-in defaults"
    for addr in config.server.listen:
        try:
            parse_listen_address(addr)
        except ValueError as exc:
            problems.append(f"[server] listen: {exc}")
    if config.model.path is None:
        print("bitnetd: no [model] path: the demo model would be served")
    else:
        try:
            from bitnetd_trio.engine import native as engine

            model = engine.Model.load(config.model.path)
        except Exception as exc:  # noqa: BLE001 - ModelLoadError, or the engine not built
            problems.append(f"[model] path: {config.model.path}: {exc}")
        else:
            try:
                hp = model.hparams
                print(
                    f"bitnetd: model {Path(config.model.path).name}: {hp.architecture}, "
                    f"{hp.n_layer} layers, {hp.n_embd} embd, vocab {hp.n_vocab}, "
                    f"context {hp.n_ctx_train}"
                )
                from bitnetd_trio.engine.tokenizer import Tokenizer

                Tokenizer.from_model(model)
            except Exception as exc:  # noqa: BLE001 - a vocabulary the tokenizer cannot use
                problems.append(f"[model] path: {config.model.path}: tokenizer: {exc}")
            finally:
                model.close()
    for problem in problems:
        print(f"bitnetd: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"bitnetd: configuration OK ({source})")
    return 0
