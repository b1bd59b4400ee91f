"""Run per-case jobs in worker processes with a tqdm bar; resume markers; end-of-run reports.

Workers come from a ``forkserver`` (``spawn`` where there is none), never a plain fork: ITK keeps a thread pool, and
forking a process with live threads can deadlock;
``workers=1`` runs in-process. A job function returns an :class:`Outcome`; a :class:`ConversionError` raised in it
becomes a failed outcome, any other exception stops the run (cases already finished keep their markers, so a
rerun resumes).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nnunet_universal.atomic_io import atomic_write_json
from nnunet_universal.dataset_conversion.common import SKIP_HINT, ConversionError, Layout

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """Result of one case: its marker (written by the job) or the error that rejected it."""

    case_id: str
    marker: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None


def _init_worker(threads: int, main_pid: int) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    _exit_with(main_pid)


def _exit_with(main_pid: int) -> None:
    """End this worker as soon as the main process ``main_pid`` has ended, even by SIGKILL (which it cannot act
    on): the worker's results would go nowhere, and an orphaned worker keeps the forkserver and the resource
    tracker alive. A daemon thread waits on a pidfd (Linux), else checks every 0.5 s. Files the worker was
    writing stay in the dataset's temp folder, which the next run removes (:meth:`Layout.prepare`)."""
    if os.name != "posix":  # spawn-based platforms: the pool's own pipes end the workers
        return

    def watch() -> None:
        try:
            fd = os.pidfd_open(main_pid)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):  # no pidfd: poll
            fd = None
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
        else:
            while True:
                time.sleep(0.5)
                try:
                    os.kill(main_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-main-process", daemon=True).start()


class _Terminated(SystemExit):
    """SIGTERM while workers run: unwinds the main process like Ctrl-C, so that the pool is shut down."""


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While in the block, SIGTERM raises :class:`_Terminated` (exit status 128 + 15) in the main thread instead of
    ending the process at once, which would leave the forkserver, the workers and the resource tracker running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _stop_pool(ex: ProcessPoolExecutor) -> None:
    """Terminate the workers now (their current case is left unfinished; its temp files are removed by the next
    run) and shut the pool down without waiting for queued jobs."""
    procs = list((getattr(ex, "_processes", None) or {}).values())  # the executor keeps no public handle
    for p in procs:
        if p.is_alive():
            p.terminate()
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(timeout=5)


def _context(fn: Callable[[Any], Outcome]) -> multiprocessing.context.BaseContext:
    """``forkserver`` where available (workers fork from a clean server that has the job's module and the main
    module preloaded, so pools start fast, no worker re-imports the CLI, and none inherits ITK's threads), else
    ``spawn``."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", fn.__module__])
        return ctx
    return multiprocessing.get_context("spawn")


def _guard(fn: Callable[[Any], Outcome], job: Any) -> Outcome:
    try:
        return fn(job)
    except ConversionError as e:
        return Outcome(case_id=e.case or str(getattr(job, "case_id", "")), error=e.as_dict())


def run_jobs(fn: Callable[[Any], Outcome], jobs: list[Any], workers: int, desc: str,
             skip_bad: bool) -> list[Outcome]:
    """Run ``fn`` over ``jobs``; stop at the first failed case unless ``skip_bad`` (then raise its error)."""
    outcomes: list[Outcome] = []

    def take(o: Outcome) -> bool:
        outcomes.append(o)
        return o.error is not None and not skip_bad

    with tqdm(total=len(jobs), desc=desc, unit="case", disable=None) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                stop = take(_guard(fn, job))
                bar.update()
                if stop:
                    break
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            with _sigterm_unwinds():
                ex = ProcessPoolExecutor(max_workers=workers, mp_context=_context(fn), initializer=_init_worker,
                                         initargs=(threads, os.getpid()))
                pending: set[Future] = set()
                it: Iterable[Any] = iter(jobs)
                stop = False
                try:
                    while True:
                        while not stop and len(pending) < 2 * workers and (job := next(it, None)) is not None:
                            pending.add(ex.submit(_guard, fn, job))
                        if not pending:
                            break
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            stop = take(f.result()) or stop
                            bar.update()
                except BaseException:  # SIGTERM, Ctrl-C, a job's unexpected error: stop the workers now
                    _stop_pool(ex)
                    raise
                ex.shutdown(wait=True)
    failed = [o for o in outcomes if o.error]
    if failed and not skip_bad:
        e = failed[0].error
        raise ConversionError(e["problem"], case=e["case"], file=e["file"],
                              fix=f"{e['fix']}; {SKIP_HINT}" if e["fix"] else SKIP_HINT)
    return outcomes


def is_complete(layout: Layout, case_id: str, key: str) -> dict[str, Any] | None:
    """The case's marker if it says the case was finished with this ``key`` and its outputs still exist."""
    import json

    m = layout.marker(case_id)
    if not m.is_file():
        return None
    try:
        marker = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    if marker.get("key") != key or not all((layout.root / o).is_file() for o in marker.get("outputs", [])):
        return None
    return marker


def finish_case(layout: Layout, case_id: str, marker: dict[str, Any]) -> Outcome:
    """Write the case's marker (last step of a job: the case is complete once this file exists).

    Atomic but not fsync'ed: the case's outputs are not either (an fsync per file would cost more than the
    conversion), so syncing the marker alone would promise nothing after a power loss; a marker whose outputs
    were lost is caught by merge's checksum comparison and integrity check.
    """
    atomic_write_json(marker, layout.marker(case_id), fsync=False)
    return Outcome(case_id=case_id, marker=marker)


def remove_orphans(layout: Layout, keep_cases: set[str], keep_outputs: set[str]) -> None:
    """Delete outputs and markers of cases no longer produced (removed, skipped or moved between splits)."""
    for m in layout.markers.glob("*.json"):
        if m.stem not in keep_cases:
            m.unlink()
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        d = layout.root / sub
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if f.is_file() and f"{sub}/{f.name}" not in keep_outputs:
                logger.info("removing stale output %s", f)
                f.unlink()
        if sub.endswith("Ts") and not any(d.iterdir()):
            d.rmdir()
    layout.finish()


def write_report(root: Path, skipped: list[dict[str, str]], what: str) -> None:
    """``conversion_report.json`` + ``.md`` listing skipped cases (removed when nothing was skipped)."""
    js, md = root / "conversion_report.json", root / "conversion_report.md"
    if not skipped:
        for p in (js, md):
            p.unlink(missing_ok=True)
        return
    atomic_write_json({"what": what, "skipped": skipped, "num_skipped": len(skipped)}, js)
    lines = [f"# {what}: {len(skipped)} case(s) skipped", "", "| case | file | problem | what to do |",
             "|---|---|---|---|"]
    for s in skipped:
        cells = [s.get(k, "").replace("|", "\\|") for k in ("case", "file", "problem", "fix")]
        lines.append("| " + " | ".join(cells) + " |")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md)
    logger.warning("%s: skipped %d case(s); see %s", what, len(skipped), md)
