"""The collectives of a compiled XLA program (its optimized HLO text): which, on what shapes, how often per call.

`collectives(compiled.as_text())` lists every all-gather, all-reduce, reduce-scatter, all-to-all and
collective-permute (their async `-start` forms included, and those wrapped in `async-start`), with its operand types
and bytes per device, and how many times one call runs it: a while loop's body counts its known trip count (the layer
scan, the log-prob chunks), a conditional's branches count once each (an upper bound). What a data-parallel step
should need is the LoRA gradients' all-reduce and a few scalars; anything else is a sign of a sharding that XLA had
to mend (bench/trainer_bench.py --hlo_collectives prints the table for a real shape).
"""

import re
from dataclasses import dataclass

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) ")
_CALLED = re.compile(r"\b(?:body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    operands: str  # operand types, e.g. "f32[4,32,128]"
    operand_bytes: int  # per device, per run
    result: str
    result_bytes: int  # per device, per run (an all-gather's: what every device ends up holding)
    times: int  # runs per call of the program
    where: str  # the jax op it came from (metadata op_name)

    @property
    def total_bytes(self) -> int:
        """Bytes a device sends or receives per call, roughly: the larger side, times the runs."""
        return self.times * max(self.operand_bytes, self.result_bytes)


def type_bytes(hlo_type: str) -> int:
    """Bytes of every array in an HLO type (a tuple's elements summed; layouts ignored)."""
    total = 0
    for dtype, dims in _ARRAY.findall(hlo_type):
        if dtype in _BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _BYTES[dtype]
    return total


def _parse(text: str):
    """{computation: [(name, type, op, rest of line)]}, {instruction name: type}, the entry's name."""
    comps, types, entry, current = {}, {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and line.rstrip().endswith("{"):
                current = m.group(1)
                comps[current] = []
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            name, typ, op, rest = m.groups()
            types[name] = typ
            comps[current].append((name, typ, op, rest))
    return comps, types, entry


def _multiplicities(comps: dict, entry: str) -> dict[str, int]:
    """Runs of each computation per run of the entry (while bodies times their known trip count)."""
    times = {entry: 1}
    order = [entry]
    for comp in order:  # breadth-first over the call graph (HLO has no recursion)
        for _, _, op, rest in comps.get(comp, ()):
            trips = 1
            if op == "while":
                m = _TRIPS.search(rest)
                trips = int(m.group(1)) if m else 1
            called = _CALLED.findall(rest)
            for group in _BRANCHES.findall(rest):
                called += [c.strip().lstrip("%") for c in group.split(",")]
            for c in called:
                if c in comps:
                    if c not in times:
                        order.append(c)
                    times[c] = times.get(c, 0) + times[comp] * trips
    return times


def _kind(op: str) -> str | None:
    base = op.removesuffix("-start")
    return base if base in KINDS else None


def collectives(text: str) -> list[Collective]:
    """Every collective of an optimized HLO module's text, with its runs per call (0-run ones left out)."""
    comps, types, entry = _parse(text)
    times = _multiplicities(comps, entry)
    out = []
    for comp, instrs in comps.items():
        for _, typ, op, rest in instrs:
            kind = _kind(op)
            if kind is None or not times.get(comp):
                continue
            args = re.findall(r"%([\w.\-]+)", rest.split("),", 1)[0])
            operands = ", ".join(types.get(a, "?") for a in args)
            where = re.search(r'op_name="([^"]*)"', rest)
            out.append(Collective(kind, re.sub(r"\{[\d,]*\}", "", operands),
                                  sum(type_bytes(types.get(a, "")) for a in args),
                                  re.sub(r"\{[\d,]*\}", "", typ), type_bytes(typ), times[comp],
                                  where.group(1) if where else ""))
    return out


def loops(text: str) -> list[tuple[int, int, str]]:
    """(runs per call, known trip count or 0, jax op) of every while loop: the layer scans and the log-prob chunk
    loops; a chunk loop whose trips grow with the device count computes other devices' rows."""
    comps, _, entry = _parse(text)
    times = _multiplicities(comps, entry)
    out = []
    for comp, instrs in comps.items():
        for _, _, op, rest in instrs:
            if op == "while" and times.get(comp):
                trips, where = _TRIPS.search(rest), re.search(r'op_name="([^"]*)"', rest)
                out.append((times[comp], int(trips.group(1)) if trips else 0, where.group(1) if where else ""))
    return out


def table(items: list[Collective]) -> str:
    """A plain-text table of `items`, biggest traffic first, with the total per kind."""
    lines = [f"{'collective':<19} {'times':>5} {'in bytes':>12} {'out bytes':>12} {'bytes/call':>13}  operands -> "
             f"result  <- jax op"]
    for c in sorted(items, key=lambda c: -c.total_bytes):
        lines.append(f"{c.kind:<19} {c.times:>5} {c.operand_bytes:>12,} {c.result_bytes:>12,} {c.total_bytes:>13,}  "
                     f"{c.operands[:60]} -> {c.result[:40]}  <- {c.where[-60:]}")
    for kind in KINDS:
        mine = [c for c in items if c.kind == kind]
        if mine:
            lines.append(f"total {kind}: {sum(c.times for c in mine)} runs, "
                         f"{sum(c.total_bytes for c in mine):,} bytes a device")
    return "\n".join(lines)
