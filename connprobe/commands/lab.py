"""`connprobe lab up|down|status`: a lab that outlives the command, for poking at by hand."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from connprobe.commands.output import add_output_option, output_format, write_document
from connprobe.lab.plumbing import LabError
from connprobe.lab.topology import ROLES, SERVER_ROLES, Lab, list_labs, remove_lab, remove_stale_labs, role_addresses


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--id", help="lab id (default: a new one for up; for down, the only running lab)")
    p.add_argument("--all", action="store_true", help="with down: remove every lab, stale ones included")
    add_output_option(p, "with status: {labs: [{id, persistent, owner_pid, owner_alive, namespaces, stale}]}")


def run(args: argparse.Namespace) -> int:
    out = Console()
    err = Console(stderr=True)
    fmt = output_format(args)
    if fmt != "text" and args.action != "status":
        err.print(f"connprobe lab {args.action}: -o {fmt} is for lab status only", markup=False, highlight=False)
        return 2
    try:
        if args.action == "up":
            return _up(out, args.id)
        if args.action == "down":
            return _down(out, err, args.id, args.all)
        return _status(out, fmt)
    except LabError as exc:
        err.print(f"connprobe lab {args.action}: {exc}", markup=False, highlight=False)
        return 2


def _up(out: Console, lab_id: str | None) -> int:
    stale = remove_stale_labs()
    if stale:
        out.print(f"removed stale lab(s) left by a crashed run: {', '.join(stale)}")
    lab = Lab(lab_id, persistent=True).up()
    t = Table(title=f"lab {lab.id} is up", show_lines=False)
    for col in ("role", "namespace", "IPv4", "IPv6", "serves"):
        t.add_column(col)
    for role in ROLES:
        a4, a6 = role_addresses(role) if role != "router" else ("10.77.1.1 / 10.77.2.1", "fd77:1::1 / fd77:2::1")
        serves = {"client": "probes (resolv.conf: lab DNS)", "router": "path faults",
                  "dns": f"DNS :53 {lab.zone}"}.get(role, "HTTP :8080, TLS :8443")
        t.add_row(role, lab.ns_name(role), a4, a6, serves)
    out.print(t)
    s1 = lab.server(SERVER_ROLES[0])
    out.print(f"try:  ip netns exec {lab.ns_name('client')} curl {s1.url()}")
    out.print(f"      ip netns exec {lab.ns_name('client')} curl http://{s1.hostname}:{s1.port}/slow?delay=0.2")
    out.print(f"stop: connprobe lab down --id {lab.id}")
    return 0


def _down(out: Console, err: Console, lab_id: str | None, everything: bool) -> int:
    labs = list_labs()
    if everything:
        targets = [st["id"] for st in labs]
    elif lab_id:
        if lab_id not in {st["id"] for st in labs}:
            err.print(f"connprobe lab down: no lab with id {lab_id!r} (see: connprobe lab status)")
            return 2
        targets = [lab_id]
    elif len(labs) == 1:
        targets = [labs[0]["id"]]
    elif not labs:
        out.print("no lab is running")
        return 0
    else:
        err.print("connprobe lab down: several labs are running; name one with --id or use --all")
        return 2
    failed = False
    for t in targets:
        problems = remove_lab(t)
        out.print(f"lab {t} removed" + (f" ({'; '.join(problems)})" if problems else ""))
        failed |= bool(problems)
    return 1 if failed else 0


def _status(out: Console, fmt: str = "text") -> int:
    labs = list_labs()
    if fmt != "text":
        write_document({"labs": [{"id": st["id"], "persistent": bool(st.get("persistent")),
                                  "owner_pid": st.get("owner_pid"), "owner_alive": bool(st.get("owner_alive")),
                                  "namespaces": len(st.get("namespaces", {}) or st.get("present", [])),
                                  "stale": bool(st["stale"])} for st in labs]}, fmt)
        return 0
    if not labs:
        out.print("no lab is running")
        return 0
    t = Table()
    for col in ("id", "kind", "owner", "namespaces", "state"):
        t.add_column(col)
    for st in labs:
        kind = "persistent" if st.get("persistent") else "test/demo"
        owner = str(st.get("owner_pid", "-")) + (" (alive)" if st.get("owner_alive") else " (gone)")
        n = len(st.get("namespaces", {}) or st.get("present", []))
        t.add_row(st["id"], kind, owner, str(n), "stale: removed by the next up or down --all" if st["stale"] else "ok")
    out.print(t)
    return 0

