"""In-sandbox code: the fork server, the supervisor of one sandbox, and the workers that run its jobs.

Started by `antipasto_pl.env.sandbox` as ``python -I -S -B harness/__main__.py --serve SOCK_FD LIFELINE_FD``
(a long-lived fork server, one per grading process) or ``... --run HEADER FDS LIFELINE_FD`` (one
sandbox, where no fork server is possible); `__main__` says how it loads these modules. They must
stay stdlib-only (no site-packages, no other antipasto_pl module) and side-effect free on import,
because the trainer imports some of them too: the grader `canonical` (to treat expected values
exactly like results), the sandbox the labels of `worker` and the workdir of `view`.

A sandbox runs a sequence of jobs (the grader's oracle, then its loophole grade). Process layout::

    spawner    (the fork server; trusted, imports done): forks each sandbox's first process -- as root
               into a fresh pid namespace and namespaces it prepared once (`spawner._Spawner`).
    launcher   (only without root): creates a user namespace and the others, forks the supervisor.
    supervisor (pid 1 of the sandbox's pid namespace; trusted code only): its own mount/ipc/uts
               namespaces in the view of nothing but Python (`view._python_view`), a fresh /proc, a
               private tmpfs for working dirs, its memory cgroup (`memory._MemoryGroup`), then no
               privileges (and a saved uid no job has, so no job can lower its rlimits). Then
               for each job in turn: reads the job, creates its fresh working dir, forks its worker,
               enforces the wall deadline and the lifeline, kills every other process in the
               namespace (daemons included), reads back the files to collect and reports -- so
               nothing a job started is still running when the next one begins. It reads job i only
               when job i starts, so no worker ever has a later job's data (say, the expected values
               a loophole grade compares with) in its memory. A job that cannot start (an earlier
               one filled the disk, say) ends the sandbox; the grader runs the rest in a fresh one.
    worker     (runs the submission): closes every fd but its own, rlimits, "ready" byte on a pipe
               it then closes, exec + mode check, "done" record.

Modules, each read top to bottom: `server` (the two modes), `spawner` (with the spare and the
launcher), `supervisor`, `worker`; what they stand on: `kernel` (libc, flags), `view`, `memory`
(cgroups), `records` (the channels below), `canonical` (the oracle's strict form).

Jobs of one sandbox share its namespaces and its uid; each has its own working dir, fds and nonce.
A later job can see what an earlier one left in the sandbox (its files, SysV IPC objects) but not the
other way round, and an earlier job's collected files are read before the next job starts; the
grader therefore runs the oracle first.

Record channels, by who can write them: the supervisor reports on a status pipe no worker holds
(each job's exit status, whether its worker got ready, its OOM kills and collected files; setup
failures), so those are the submission's effects as observed from outside. Each worker writes one
"done" record (its job's nonce, its verdict or oracle answers) to its own result file (unnamed; the
grader reads it once the job is over). That file is writable by any code in the worker, the
submission's included -- no secret can be kept from code running in the same process -- so the
grader treats the record as the submission's data: it is checked field by field and against the
exit status the supervisor saw (`sandbox._parse_done`), the oracle's answers are compared with the
expected values outside, and the stdout, file and exit-status verdicts never depend on it.
"""
