#!/usr/bin/python3
"""Runs a program under the system call filter a systemd unit gives its service, as systemd
would apply it: the unit's SystemCallFilter= lines (an allow list, then `~` lines taking
sets out), SystemCallErrorNumber=EPERM, the native ABI only (SystemCallArchitectures=native)
and MemoryDenyWriteExecute=yes. The sets (@system-service...) are read from
`systemd-analyze syscall-filter`, so they are systemd's own.

usage: seccomp-exec.py UNIT-FILE PROGRAM ARGS...   (the process must have no_new_privs set)

scripts/test-package runs the installed server under the installed unit's filter with it:
systemd-run needs systemd as PID 1, which the CI container lacks. Debian: python3-seccomp
(libseccomp's bindings)."""
import errno
import os
import subprocess
import sys

import seccomp


def expand(name, seen):
    """The system calls a name stands for: a set (@...) with its nested sets, or itself."""
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(["systemd-analyze", "syscall-filter", name],
                         capture_output=True, text=True, check=True).stdout
    names = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            names |= expand(word, seen)
    return names


def service_settings(unit):
    """The [Service] settings of a unit file: name -> list of values, in order."""
    settings, section = {}, None
    with open(unit, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def main():
    unit, program = sys.argv[1], sys.argv[2:]
    settings = service_settings(unit)
    filters = settings.get("SystemCallFilter", [])
    if not filters or filters[0].startswith("~"):
        sys.exit(f"seccomp-exec: {unit} has no SystemCallFilter= allow list")
    if settings.get("SystemCallErrorNumber") != ["EPERM"]:
        sys.exit(f"seccomp-exec: {unit}: expected SystemCallErrorNumber=EPERM")
    allowed = set()
    for value in filters:
        deny = value.startswith("~")
        names = set()
        for name in value.lstrip("~").split():
            names |= expand(name, set())
        allowed = allowed - names if deny else allowed | names
    mdwe = settings.get("MemoryDenyWriteExecute") == ["yes"]

    flt = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    # The filter covers the native ABI only (SystemCallArchitectures=native): a call through
    # another ABI gets libseccomp's bad-architecture action (killed).
    prot_write, prot_exec, shm_exec = 0x2, 0x4, 0o100000
    known = 0
    for name in sorted(allowed):
        try:
            if mdwe and name == "mmap":
                # Never writable and executable at once.
                flt.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, prot_write, 0))
                flt.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, prot_exec, 0))
            elif mdwe and name in ("mprotect", "pkey_mprotect"):
                # Memory never becomes executable later.
                flt.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, prot_exec, 0))
            elif mdwe and name == "shmat":
                flt.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, shm_exec, 0))
            else:
                flt.add_rule(seccomp.ALLOW, name)
            known += 1
        except (RuntimeError, ValueError, OSError):
            pass  # a name this kernel or libseccomp does not know
    print(f"seccomp-exec: {known} system calls allowed by {unit}"
          f"{' (MemoryDenyWriteExecute)' if mdwe else ''}; any other fails with EPERM",
          file=sys.stderr)
    flt.load()
    os.execv(program[0], program)


main()
