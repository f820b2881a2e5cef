"""Static integrity check of a candidate train.py, run before it ever runs.

    from autoresearch_kit.integrity import check_source
    problems = check_source(open("train.py").read())   # [] = fine
    # ['line 12: assigns to harness.metric ... (train.py may not change the harness ...)']

The runner calls it on every candidate (problems -> status `invalid`, not run), and
proposers call it to reject an edit before it costs a training run. It reads the
source with `ast`; nothing is executed.

What it looks for (each problem names the line, what was found and why it matters;
docs/THREAT_MODEL.md has the full picture):

* imports: `autoresearch_kit.harness` is the only part of the kit train.py may use;
  no importlib/ctypes/builtins/subprocess/signal/inspect/unittest.mock.
* tampering: no writes, deletes, setattr/delattr/vars, in-place mutation or
  underscore access on the harness module or the run object (`run = harness.start()`),
  nor on imported modules (monkeypatching `time.perf_counter`, `torch.cuda.synchronize`,
  `F.cross_entropy`, ...). Backend switches (`torch.backends.*`,
  `torch._inductor.config.*`, `torch._dynamo.config.*`) stay allowed.
* the evaluation: no reference to the validation split (`val.bin`, `.val`), the metric,
  the channel, `PreparedData`, or AUTORESEARCH_* variables (the runner's settings).
* interpreter back doors: eval/exec/__import__, sys.modules, frames, gc.get_objects,
  __dict__, __subclasses__, tracing hooks, torch function/dispatch modes, operator
  overrides, process creation (fork, setsid, subprocess), /proc.
* the contract: the script calls `harness.start()` and `run.finish(...)`.

This is a tripwire for the reward hacks an editing agent stumbles into, not a sandbox:
computed names slip past any static check. The runner adds runtime checks (it owns the
clock and kill switch, verifies the signed result and the eval tokens it set).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path

HARNESS_MODULE = "autoresearch_kit.harness"

# Whole modules train.py has no business importing, with the reason shown to the agent.
FORBIDDEN_MODULES = {
    "importlib": "imports modules by computed name, which hides what is used",
    "ctypes": "reads and writes process memory directly",
    "cffi": "reads and writes process memory directly",
    "builtins": "patching builtins changes the harness's code too",
    "__builtin__": "patching builtins changes the harness's code too",
    "subprocess": "starts processes that can outlive the run; train.py trains in one process",
    "multiprocessing": "starts processes that can outlive the run (torch's DataLoader workers are fine)",
    "pty": "starts processes that can outlive the run",
    "signal": "changes how the runner stops the run",
    "inspect": "reaches into the harness's frames and objects",
    "unittest": "mock.patch monkeypatches code the evaluation uses",
    "mock": "mock.patch monkeypatches code the evaluation uses",
    "pytest": "monkeypatch changes code the evaluation uses",
}

# Functions of allowed modules that are back doors. (module, name) -> reason.
FORBIDDEN_FUNCTIONS = {
    ("sys", "modules"): "sys.modules reaches every module, including the metric",
    ("sys", "settrace"): "a trace function can rewrite the harness's local variables",
    ("sys", "setprofile"): "a profile function can rewrite the harness's local variables",
    ("sys", "monitoring"): "monitoring callbacks can rewrite the harness's local variables",
    ("threading", "settrace"): "a trace function can rewrite the harness's local variables",
    ("threading", "setprofile"): "a profile function can rewrite the harness's local variables",
    ("gc", "get_objects"): "finds the harness's private objects (the channel, the metric)",
    ("gc", "get_referrers"): "finds the harness's private objects (the channel, the metric)",
    ("gc", "get_referents"): "finds the harness's private objects (the channel, the metric)",
    ("torch", "overrides"): "torch function modes can change what the evaluation computes",
    ("torch", "library"): "operator overrides can change what the evaluation computes",
}
for _name in ("fork", "forkpty", "setsid", "setpgrp", "setpgid", "system", "popen", "kill", "killpg",
              "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
              "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
              "posix_spawn", "posix_spawnp", "register_at_fork"):
    FORBIDDEN_FUNCTIONS[("os", _name)] = "starts or signals processes; train.py trains in one process"

# Attribute names that only interpreter back doors use.
FORBIDDEN_ATTRIBUTES = {
    "__dict__": "writes through __dict__ bypass every check",
    "__globals__": "reaches another module's globals",
    "__closure__": "reaches another function's variables",
    "__code__": "swaps a function's code",
    "__subclasses__": "finds classes the harness uses",
    "__builtins__": "patching builtins changes the harness's code too",
    "__setattr__": "a disguised attribute write",
    "__getattribute__": "a disguised attribute read that bypasses the check on private names",
    "__delattr__": "a disguised attribute delete",
    "_getframe": "reaches into the harness's frames",
    "_current_frames": "reaches into the harness's frames",
    "f_back": "reaches into the harness's frames",
    "f_globals": "reaches into the harness's frames",
    "f_locals": "reaches into the harness's frames",
    "f_builtins": "reaches into the harness's frames",
    "gi_frame": "reaches into another frame",
    "tb_frame": "reaches into another frame",
    "cr_frame": "reaches into another frame",
    "__torch_function__": "a tensor subclass can fake what the loss computes",
    "__torch_dispatch__": "a tensor subclass can fake what the loss computes",
    "TorchFunctionMode": "a torch function mode can change what the evaluation computes",
    "TorchDispatchMode": "a dispatch mode can change what the evaluation computes",
}

# Names that belong to the evaluation side. train.py sees training data only.
EVALUATION_NAMES = {
    "val": "the validation split is scored by the harness, never read by train.py",
    "evaluate_bpb": "the metric is the harness's; train.py hands its model to run.finish",
    "causality_probe": "the causality probe is the harness's",
    "metric": "the metric module is the harness's",
    "channel": "the trusted result channel is the harness's",
    "ChildChannel": "the trusted result channel is the harness's",
    "ParentChannel": "the trusted result channel is the harness's",
    "PreparedData": "the prepared data (with its validation split) is the harness's; use run.train_loader",
}

# Builtins that hide what code does; flagged unless train.py defines the name itself.
FORBIDDEN_BUILTINS = {
    "eval": "runs code the check cannot see",
    "exec": "runs code the check cannot see",
    "compile": "builds code the check cannot see (torch.compile is fine)",
    "__import__": "imports modules by computed name",
    "breakpoint": "stops the run waiting for a debugger",
}

# Module attributes train.py may set: backend switches, not code.
ALLOWED_MODULE_WRITES = ("torch.backends.", "torch._inductor.config.", "torch._dynamo.config.",
                         "torch._functorch.config.")

# Methods that change an object in place (torch's trailing underscore covers the rest).
MUTATING_METHODS = {"update", "append", "extend", "insert", "remove", "pop", "popitem", "clear",
                    "setdefault", "sort", "reverse", "fill", "put", "resize", "setflags", "itemset",
                    "__setitem__", "__delitem__", "__init__", "discard", "add"}

@functools.lru_cache(maxsize=1)
def _trusted_private_names() -> frozenset[str]:
    """Private names of the harness and the channel (`_CHANNEL`, `_s`, `_key`, ...).

    Read from their source, so the list follows the code. Reaching one of them through
    any object (an alias the check cannot follow, say) is how a result would be forged.
    """
    names: set[str] = set()
    here = Path(__file__).resolve().parent
    for module in ("harness.py", "wire.py"):
        try:
            tree = ast.parse((here / module).read_text())
        except (OSError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                candidate = node.id
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                candidate = node.attr
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                candidate = node.name
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__"
                                                      for t in node.targets):
                names.update(c.value for c in ast.walk(node.value)  # __slots__ = ("_s",)
                             if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.startswith("_"))
                continue
            else:
                continue
            if candidate.startswith("_") and not candidate.startswith("__") and candidate.isidentifier() \
                    and len(candidate) > 1:
                names.add(candidate)
    return frozenset(names)


_SHARED = "train.py may not change the harness or the run object: they own the clock, the budget and the metric"


@dataclass
class _Names:
    """What the names in train.py refer to, as far as a static reading can tell."""

    harness: set[str] = field(default_factory=set)        # the harness module (or names from it)
    run: set[str] = field(default_factory=set)            # the run object, and aliases
    kit_root: set[str] = field(default_factory=set)       # `autoresearch_kit` after `import autoresearch_kit.harness`
    modules: dict[str, str] = field(default_factory=dict)  # name -> dotted module path
    defined: set[str] = field(default_factory=set)        # every name train.py binds itself
    functions: dict[str, list[str]] = field(default_factory=dict)  # def name -> parameter names
    derived: set[str] = field(default_factory=set)        # names bound to a part of them (`b = run.budget`)

    @property
    def shared(self) -> set[str]:
        return self.harness | self.run | self.kit_root


def _root(node: ast.AST) -> ast.AST:
    """The innermost object of an attribute/subscript/call chain (`a` in `a.b[1].c()`)."""
    while True:
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Starred):
            node = node.value
        else:
            return node


def _dotted(node: ast.AST, names: _Names) -> str | None:
    """`torch.nn.functional.cross_entropy` for a pure attribute chain on a module, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in names.modules:
        return ".".join([names.modules[node.id]] + parts[::-1])
    return None


def _chain_has(node: ast.AST, pred) -> bool:
    """Whether any link of an attribute/subscript/call chain satisfies pred."""
    while True:
        if pred(node):
            return True
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        else:
            return False


def _is_class_of(node: ast.AST) -> bool:
    """`type(x)` or `x.__class__`: patching it changes every object of that class."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type") or \
        (isinstance(node, ast.Attribute) and node.attr == "__class__")


def _is_namespace_call(node: ast.AST) -> bool:
    """`globals()`, `locals()`, `vars(...)`: a dict view of a namespace."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("globals", "locals", "vars")


def _collect(tree: ast.Module) -> _Names:
    """First pass: imports, definitions, and which names hold the harness or the run."""
    names = _Names()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == HARNESS_MODULE and a.asname:
                    names.harness.add(a.asname)
                elif a.name.split(".")[0] == "autoresearch_kit" and not a.asname:
                    names.kit_root.add("autoresearch_kit")
                bound = a.asname or a.name.split(".")[0]
                names.modules[bound] = a.name if a.asname else bound
                names.defined.add(bound)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                bound = a.asname or a.name
                names.defined.add(bound)
                full = f"{node.module}.{a.name}"
                if full == HARNESS_MODULE or node.module == HARNESS_MODULE:
                    names.harness.add(bound)
                else:
                    names.modules[bound] = full
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.defined.add(node.name)
            names.functions[node.name] = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
        elif isinstance(node, ast.ClassDef):
            names.defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.defined.add(node.id)
        elif isinstance(node, ast.arg):
            names.defined.add(node.arg)

    # Aliases and the run object, to a fixed point (`h = harness; run = h.start(); r = run`).
    def is_start_call(value: ast.AST) -> bool:
        if not isinstance(value, ast.Call):
            return False
        f = value.func
        if isinstance(f, ast.Name):
            return f.id in names.harness and f.id.endswith("start")
        return isinstance(f, ast.Attribute) and f.attr == "start" and isinstance(_root(f), ast.Name) \
            and _root(f).id in names.shared

    def bind(target: ast.AST, value: ast.AST) -> bool:
        if not isinstance(target, ast.Name):
            return False
        t = target.id
        if is_start_call(value):
            if t not in names.run:
                names.run.add(t)
                return True
            return False
        if isinstance(value, (ast.Name, ast.Attribute)) and not _chain_has(value, lambda n: isinstance(n, ast.Call)):
            root = _root(value)
            if not isinstance(root, ast.Name):
                return False
            if root.id in names.shared and isinstance(value, ast.Attribute):
                names.derived.add(t)  # `b = run.budget`: in-place changes of b change the run
            if root.id in names.run and t not in names.run:
                names.run.add(t)  # `r = run` or `b = run.budget`: still the run's
                return True
            if root.id in names.harness | names.kit_root and t not in names.harness:
                names.harness.add(t)
                return True
            dotted = _dotted(value, names)
            if dotted and names.modules.get(t) != dotted and root.id in names.modules:
                names.modules[t] = dotted
                return True
        return False

    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    changed |= bind(target, node.value)
            elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                changed |= bind(node.target, node.value)
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                changed |= bind(node.optional_vars, node.context_expr)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names.functions:
                # A function that receives the run under another name still holds the run.
                params = names.functions[node.func.id]
                pairs = list(zip(params, node.args)) + [(k.arg, k.value) for k in node.keywords if k.arg]
                for param, arg in pairs:
                    if isinstance(arg, ast.Name) and arg.id in names.shared | names.run:
                        group = names.run if arg.id in names.run else names.harness
                        if param not in group:
                            group.add(param)
                            changed = True
    return names


class _Checker(ast.NodeVisitor):
    """Second pass: one readable problem per offending construct."""

    def __init__(self, names: _Names) -> None:
        self.n = names
        self.problems: list[tuple[int, str]] = []
        self.calls_start = False
        self.calls_finish = False

    def add(self, node: ast.AST, what: str, why: str) -> None:
        self.problems.append((getattr(node, "lineno", 0), f"line {getattr(node, 'lineno', '?')}: {what} ({why})"))

    # -- helpers ------------------------------------------------------------

    def _shared_root(self, node: ast.AST) -> str | None:
        """'harness' / 'run' if the chain starts at one of them, else None."""
        root = _root(node)
        if isinstance(root, ast.Name):
            if root.id in self.n.run:
                return "the run object"
            if root.id in self.n.harness | self.n.kit_root:
                return "the harness"
        return None

    def _module_root(self, node: ast.AST) -> str | None:
        root = _root(node)
        if isinstance(root, ast.Name) and root.id in self.n.modules:
            return self.n.modules[root.id]
        return None

    @staticmethod
    def _text(node: ast.AST) -> str:
        text = ast.unparse(node)
        return text if len(text) <= 80 else text[:77] + "..."

    # -- imports --------------------------------------------------------------

    def _check_module(self, node: ast.AST, module: str) -> None:
        top = module.split(".")[0]
        if top == "autoresearch_kit" and module not in ("autoresearch_kit", HARNESS_MODULE):
            self.add(node, f"imports {module}", "train.py may use autoresearch_kit.harness and nothing else of the kit")
        elif top in FORBIDDEN_MODULES or module in FORBIDDEN_MODULES:
            self.add(node, f"imports {module}", FORBIDDEN_MODULES.get(module) or FORBIDDEN_MODULES[top])
        elif module.startswith(("torch.overrides", "torch.library", "torch.utils._python_dispatch")):
            self.add(node, f"imports {module}", "function/dispatch modes and operator overrides can change what "
                                                "the evaluation computes")

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._check_module(node, a.name)
            if a.name == "autoresearch_kit":
                self.add(node, "imports autoresearch_kit", "import autoresearch_kit.harness (or `from autoresearch_kit import harness`)")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:
            self.add(node, "uses a relative import", "train.py is a script; import packages by name")
        self._check_module(node, module)
        for a in node.names:
            if module == "autoresearch_kit" and a.name != "harness":
                self.add(node, f"imports {a.name} from autoresearch_kit",
                         "train.py may use autoresearch_kit.harness and nothing else of the kit")
            elif module == HARNESS_MODULE and a.name.startswith("_"):
                self.add(node, f"imports {a.name} from the harness", "private parts of the harness are off limits")
            elif (module, a.name) in FORBIDDEN_FUNCTIONS:
                self.add(node, f"imports {module}.{a.name}", FORBIDDEN_FUNCTIONS[(module, a.name)])
            elif a.name in EVALUATION_NAMES:
                self.add(node, f"imports {a.name}", EVALUATION_NAMES[a.name])
        self.generic_visit(node)

    # -- writes ---------------------------------------------------------------

    def _check_store(self, node: ast.Attribute | ast.Subscript, verb: str) -> None:
        where = self._shared_root(node.value if isinstance(node, ast.Attribute) else node)
        text = self._text(node)
        if where:
            self.add(node, f"{verb} {text}", _SHARED)
            return
        if _chain_has(node.value, _is_class_of):
            self.add(node, f"{verb} {text}", "patching a class changes every object of it, "
                                             "including the ones the evaluation uses")
            return
        if _chain_has(node.value, _is_namespace_call):
            self.add(node, f"{verb} {text}", "writes through globals()/vars() can reach modules the evaluation uses")
            return
        module = self._module_root(node)
        if module is None:
            return
        dotted = _dotted(node, self.n)
        if dotted and dotted.startswith(ALLOWED_MODULE_WRITES):
            return
        if isinstance(node, ast.Subscript) and _dotted(node.value, self.n) == "os.environ":
            if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
                self.add(node, f"{verb} {text}", "sets an environment variable whose name is computed; "
                                                 "name it literally")
            return  # os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ... is how allocators are tuned
        self.add(node, f"{verb} {text}", f"monkeypatches the module {module}, which the harness and the "
                                         "evaluation use too; change train.py's own code instead")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._check_store(node, "assigns to" if isinstance(node.ctx, ast.Store) else "deletes")
        attr = node.attr
        if attr in FORBIDDEN_ATTRIBUTES:
            self.add(node, f"uses .{attr}", FORBIDDEN_ATTRIBUTES[attr])
        elif attr in EVALUATION_NAMES:
            self.add(node, f"uses .{attr} ({self._text(node)})", EVALUATION_NAMES[attr])
        elif attr.startswith("_") and (self._shared_root(node.value) or attr in _trusted_private_names()):
            self.add(node, f"uses {self._text(node)}", "private parts of the harness and the run are off limits")
        else:
            module = _dotted(node.value, self.n)
            if module is not None:
                key = (module, attr)
                if key in FORBIDDEN_FUNCTIONS:
                    self.add(node, f"uses {module}.{attr}", FORBIDDEN_FUNCTIONS[key])
                elif module == "sys" and attr.startswith("_"):
                    self.add(node, f"uses sys.{attr}", "private interpreter hooks reach into the harness")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._check_store(node, "assigns to" if isinstance(node.ctx, ast.Store) else "deletes")
        self.generic_visit(node)

    # -- names, strings, calls --------------------------------------------------

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            if node.id in FORBIDDEN_BUILTINS and node.id not in self.n.defined:
                self.add(node, f"uses {node.id}", FORBIDDEN_BUILTINS[node.id])
            elif node.id in ("__builtins__",):
                self.add(node, "uses __builtins__", FORBIDDEN_ATTRIBUTES["__builtins__"])
            elif node.id in ("setattr", "delattr", "getattr", "vars") and node.id not in self.n.defined \
                    and not getattr(node, "_is_call_func", False):
                self.add(node, f"passes {node.id} around", "hides which object it changes")

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            s = node.value
            if "val.bin" in s:
                self.add(node, f"mentions {s!r}", EVALUATION_NAMES["val"])
            if "AUTORESEARCH_" in s:
                self.add(node, f"mentions {s!r}", "AUTORESEARCH_* variables are the runner's settings (budget, "
                                                  "eval tokens, channel); train.py reads them through `run`")
            if s in ("__torch_function__", "__torch_dispatch__"):
                self.add(node, f"mentions {s!r}", FORBIDDEN_ATTRIBUTES[s])
            if s.startswith("_") and not s.startswith("__") and s in _trusted_private_names():
                self.add(node, f"mentions {s!r}", "names a private part of the harness or the channel")
            if s.startswith("/proc/") or "/proc/self" in s:
                self.add(node, f"mentions {s!r}", "/proc reaches the runner's pipes and this process's memory")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name in ("__torch_function__", "__torch_dispatch__"):
            self.add(node, f"defines {node.name}", FORBIDDEN_ATTRIBUTES[node.name])
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # a docstring or bare string: may mention AUTORESEARCH_BUDGET for the reader
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Name):
            f._is_call_func = True  # type: ignore[attr-defined]  (a direct call, not passed around)
            builtin = f.id not in self.n.defined
            if builtin and f.id in ("setattr", "delattr") and node.args:
                target = node.args[0]
                if self._shared_root(target) or self._module_root(target) or _chain_has(target, _is_class_of):
                    self.add(node, f"calls {f.id} on {self._text(target)}",
                             _SHARED if self._shared_root(target) else
                             "monkeypatches code the harness and the evaluation use")
            elif builtin and f.id == "getattr" and len(node.args) >= 2 and self._shared_root(node.args[0]):
                name = node.args[1]
                if not (isinstance(name, ast.Constant) and isinstance(name.value, str)) or name.value.startswith("_"):
                    self.add(node, f"calls getattr on {self._text(node.args[0])} with {self._text(name)}",
                             "only public attributes of the harness and the run, named literally")
            elif builtin and f.id == "vars" and node.args and (self._shared_root(node.args[0]) or
                                                               self._module_root(node.args[0])):
                self.add(node, f"calls vars({self._text(node.args[0])})", "a writable view of a shared namespace")
            if f.id in self.n.harness and f.id.endswith("start"):
                self.calls_start = True
        elif isinstance(f, ast.Attribute):
            where = self._shared_root(f.value)
            if f.attr == "start" and where == "the harness":
                self.calls_start = True
            if f.attr == "finish" and where == "the run object":
                self.calls_finish = True
            # run.budget.update(...), run.token_bytes.fill_(0): in-place changes of the run's state.
            derived = isinstance(f.value, (ast.Attribute, ast.Subscript)) or \
                (isinstance(f.value, ast.Name) and f.value.id in self.n.derived)
            if where and derived and \
                    (f.attr in MUTATING_METHODS or (f.attr.endswith("_") and not f.attr.startswith("_"))):
                self.add(node, f"calls {self._text(f)}(...)", _SHARED)
            if f.attr in MUTATING_METHODS and _chain_has(f.value, _is_namespace_call) and f.attr != "add":
                self.add(node, f"calls {self._text(f)}(...)", "writes through globals()/vars() can reach "
                                                               "modules the evaluation uses")
        self.generic_visit(node)


def check_source(source: str) -> list[str]:
    """Problems that forbid running a candidate train.py; an empty list means fine.

    The same source is checked by its proposer (`propose.edits.validate`) and again by
    the runner just before it runs; the answer is remembered, so the second check is free.

    Parameters
    ----------
    source
        The full text of the candidate train.py.

    Returns
    -------
    list of str
        One readable message per problem, in line order, e.g.
        ``"line 12: assigns to harness.metric.evaluate_bpb (train.py may not change ...)"``.
    """
    return list(_check(source))


@functools.lru_cache(maxsize=64)
def _check(source: str) -> tuple[str, ...]:
    try:
        tree = ast.parse(source, filename="train.py")
    except SyntaxError as e:
        return (f"line {e.lineno}: train.py does not parse (SyntaxError: {e.msg})",)
    except ValueError as e:  # null bytes
        return (f"train.py does not parse ({e})",)
    names = _collect(tree)
    checker = _Checker(names)
    checker.visit(tree)
    if not names.harness and not names.kit_root:
        checker.problems.append((1 << 30, "train.py never imports autoresearch_kit.harness (it must: "
                                    "`from autoresearch_kit import harness`; the harness keeps the budget and scores the model)"))
    elif not checker.calls_start:
        checker.problems.append((1 << 30, "train.py never calls harness.start() (it must: `run = harness.start()` "
                                    "gives it the budget, device and data)"))
    if names.run and not checker.calls_finish:
        checker.problems.append((1 << 30, "train.py never calls run.finish(model) (it must: the harness scores the "
                                    "final model there)"))
    elif not names.run and checker.calls_start:
        checker.problems.append((1 << 30, "train.py calls harness.start() but does not keep the run "
                                    "(`run = harness.start()`) to call run.finish(model)"))
    # in line order, each message once
    return tuple(dict.fromkeys(msg for _, msg in sorted(checker.problems, key=lambda p: p[0])))
