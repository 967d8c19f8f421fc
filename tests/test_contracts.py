"""Contracts the code states about itself: each Lua script's header against its wrapper
and its own parsing, one wrapper per script in release_service/scripts (the layer below
the domain: it imports only core at run time), and a package whose modules import each
other without circles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from release_service.people.limits import BookingLimits
from release_service.scripts import claim, reserve
from release_service.scripts.source import SEPARATOR

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "lua"

CLAIM = claim.ClaimRequest(
    claim_id="c", account_id="a", person_id="p", slot_id="s", idempotency_key="k",
    birth=20000101, sex="F", day="20261208", request_id="r", standby_decline_ms=1,
    admission="j")
RESERVATION = reserve.Reservation("c", "p", "r", "20261208", "clinic", "dept", BookingLimits())

# script, what the wrapper packs for one request, the variable its Lua code reads them from
PACKED = [
    ("claim.lua", claim.packed(CLAIM, "13,30,60000"), "f"),
    ("person_reserve.lua", reserve.packed(RESERVATION), "a"),
]


def header(script: str) -> str:
    text = (LUA / script).read_text()
    return text[:text.index("]]")]


@pytest.mark.parametrize(("script", "packed", "var"), PACKED, ids=[p[0] for p in PACKED])
def test_each_packed_script_argument_has_the_fields_its_header_and_its_code_name(
        script, packed, var):
    declared = int(re.search(r"(\d+) fields joined by", header(script)).group(1))
    body = (LUA / script).read_text()[len(header(script)):]
    read = max(int(n) for n in re.findall(rf"\b{var}\[(\d+)\]", body))
    sent = len(packed.split(SEPARATOR))
    assert sent == declared == read, f"{script}: wrapper sends {sent}, header says " \
        f"{declared}, the script reads {read}"


@pytest.mark.parametrize("script", sorted(p.name for p in LUA.glob("*.lua")))
def test_every_script_a_header_names_exists(script):
    named = set(re.findall(r"\b([a-z_]+\.lua)\b", (LUA / script).read_text()))
    missing = {name for name in named if not (LUA / name).exists()}
    assert not missing, f"{script} names scripts that do not exist: {missing}"


def _imports(path: Path, module: str) -> set[str]:
    """The modules of release_service and consumers that `module` imports at load time
    (imports under TYPE_CHECKING are for the type checker only)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] \
                    if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(tree.body)
    return found


def test_no_module_imports_itself_through_others():
    modules = {}
    for top in ("release_service", "consumers"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    graph = {m: {i for i in _imports(p, m) if i in modules and i != m}
             for m, p in modules.items()}
    # A package's __init__ imports nothing here, so an edge to a package is no dependency.
    graph = {m: {i for i in deps if modules[i].name != "__init__.py"}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n):], n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                walk(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)


def test_the_package_does_not_import_the_consumers():
    for path in (ROOT / "release_service").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        assert not any(i.split(".")[0] == "consumers" for i in _imports(path, module)), path


# Run before another script (prepended to it), so loaded by each wrapper that needs them.
PROLOGUES = {"eligibility.lua", "queue_advance.lua"}


def test_each_script_is_loaded_by_one_wrapper_in_scripts_and_nowhere_else():
    loaded_by: dict[str, set[str]] = {}
    for path in (ROOT / "release_service").rglob("*.py"):
        text = path.read_text()
        names = re.findall(r'lua_source\("([a-z_]+\.lua)"\)', text)
        if path.parent.name != "scripts":
            assert not names and "register_script(" not in text, \
                f"{path.relative_to(ROOT)} loads a script: its wrapper in scripts/ should"
        for name in names:
            loaded_by.setdefault(name, set()).add(path.name)
    for script in sorted(p.name for p in LUA.glob("*.lua")):
        wrappers = loaded_by.get(script, set())
        assert wrappers if script in PROLOGUES else len(wrappers) == 1, \
            f"{script} is loaded by {sorted(wrappers) or 'no module'}"


def test_the_scripts_room_imports_only_core_and_itself_at_run_time():
    for path in (ROOT / "release_service" / "scripts").glob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = {i for i in _imports(path, module) if i.split(".")[0] == "release_service"}
        above = {i for i in own if i.split(".")[:2] not in (["release_service", "core"],
                                                            ["release_service", "scripts"])}
        assert not above, f"{module} imports {sorted(above)} (under TYPE_CHECKING only)"
