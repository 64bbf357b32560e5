"""Prove, without a GPU, that a SavedModel keeps its explanation on the GPU, op by op.

With a GPU, TF Serving's placer puts each node of a signature's graph on the GPU when a GPU kernel
accepts its dtypes and on the CPU otherwise. A CPU-only op between two GPU ops makes every call copy a
tensor to the host, wait for the GPU, and copy the result back; at the edges (decoding the request,
the request checks, labels, PNG and string outputs) it costs nothing extra. TensorFlow's wheel
registers its GPU kernels also where there is no GPU, so the placement can be read from its KernelDefs
here, and a graph that would round-trip is caught by a test rather than by a GPU server's latency.

The graph of a signature is what Session::Run runs for it: the nodes its output tensors depend on
through data and control inputs in the `serve` MetaGraph, with each function call (PartitionedCall,
StatefulPartitionedCall, a node whose op is a library function; If, Case and While, whose branches and
bodies the runtime lowers into the graph) replaced by the function's body, per call site. tf.data
functions (the image decoder's map) are not flattened: they run in tf.data's host-side runtime, and
their CPU-only ops count among the signature's ops at the edges.

Each node is "gpu" when a GPU kernel accepts its type attrs (inside an XLA-compiled function, an
XLA_GPU kernel too), "any" when no kernel is needed (Placeholder, Const, calls, NoOp), the op only
forwards its input (Identity, ...) or only a DEFAULT kernel accepts it (ReadVariableOp, Assert, ...),
and "cpu" otherwise (EncodePng, DecodeImage, string ops, ...).

The rule: a tensor is on the device when a gpu node produces it on an output argument in device memory
(not in its kernel's host_memory_arg and not a string or resource, which TF always keeps on the host),
or when it is the value read from a numeric variable (TF places those on the GPU). Data edges (not
control edges) are followed from device tensors through cpu and any nodes, and through a gpu node only
from a host-memory input to its host-memory outputs (int32 shape arithmetic). A cpu node on such a path
that reaches a device-memory input of a gpu node, from a device tensor that depends on the model's
variables (any device tensor when the graph reads none), sits between two GPU ops of the explanation: a
violation. Paths from device tensors that do not depend on the model cross between GPU and host too
(the request checks' bool masks, the decoder's int64 row numbers: a few bytes each, before the model
runs); they are reported as `edge_round_trips`, not refused. The count of a signature's GPU ops is of
its gpu nodes with a device-memory argument on a data path from one of its inputs to one of its outputs.

With an XLA-compiled core (a library function with `_XlaMustCompile` = true, as `--jit-compile`
exports), the compiled functions and every function they call must also hold the whole explanation:
in each signature, every node that reads a variable (an op taking a resource that comes from a
VarHandleOp and returning a value: ReadVariableOp, ResourceGather, ...) and every gpu node with a
device-memory argument that lies on a data path from such a read to a floating-point output must run
inside a compiled function. Else that part runs op by op, outside the one XLA program.

`python -m export.gpu_kernels <export dir>` prints the report (exit status 1 on a violation).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import pathlib
import sys
from typing import Collection, Iterable, Sequence

from tensorflow.core.framework import attr_value_pb2, types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import kernels, op_def_registry

SERVE_TAG = "serve"
INIT_SIGNATURE = "__saved_model_init_op"
GPU, ANY, CPU = "gpu", "any", "cpu"
CALL_OPS = {"PartitionedCall", "StatefulPartitionedCall"}
IF_OPS = {"If", "StatelessIf"}
CASE_OPS = {"Case", "StatelessCase"}
WHILE_OPS = {"While", "StatelessWhile"}
NO_KERNEL = {"Placeholder", "PlaceholderWithDefault", "Const", "HostConst", "_Arg", "_Retval", "NoOp"}
FORWARDING = {"Identity", "IdentityN", "StopGradient", "PreventGradient", "Snapshot"}  # no kernel launch
ALWAYS_HOST = {types_pb2.DT_STRING, types_pb2.DT_STRING_REF, types_pb2.DT_RESOURCE}  # DataTypeAlwaysOnHost
NOT_ON_DEVICE = ALWAYS_HOST | {types_pb2.DT_VARIANT}
FLOATS = {types_pb2.DT_HALF, types_pb2.DT_BFLOAT16, types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE}
VARIABLE_OPS = {"VarHandleOp", "_VarHandlesOp"}
XLA_MUST_COMPILE = "_XlaMustCompile"

Ref = tuple[int, int]  # (node index in the flattened graph, output index)
Arg = tuple[str, int]  # (op-def argument name, dtype)


class GpuPlacementError(ValueError):
    """A signature would copy tensors between GPU and host in the middle of its computation."""

    def __init__(self, message: str, report: GpuReport):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class Violation:
    """One node that breaks the rule, where it lives and why."""

    signature: str
    node: str
    function: tuple[str, ...]  # the functions it lives in, outermost first; () for the top-level graph
    op: str
    dtype: str  # the dtype of the device tensor its input comes from (jit violations: the dtypes it produces)
    producer: str = ""  # a GPU op upstream ("Conv2D 'conv'"), for placement violations
    consumer: str = ""  # a GPU op downstream
    reason: str = ""  # jit violations: what should have been compiled

    @property
    def where(self) -> str:
        return " > ".join(self.function) or "the top-level graph"

    def __str__(self) -> str:
        head = f"signature {self.signature!r}: {self.op} {self.node!r} in {self.where}"
        if self.reason:
            return f"{head} {self.reason}"
        return (f"{head} sits between two GPU ops: its input comes from a {self.dtype} tensor that {self.producer} "
                f"leaves in GPU memory, and its result feeds {self.consumer} on the GPU. {self.op} has no GPU kernel "
                "for these types, so on a GPU server every call copies that tensor to the host, waits for the GPU, and "
                "copies the result back; move it after the last GPU op or replace it with ops that have GPU kernels")


@dataclasses.dataclass(frozen=True)
class SignatureReport:
    """The check of one signature's flattened graph."""

    name: str
    nodes: int  # flattened nodes Session::Run runs for it
    gpu_ops: int  # gpu nodes with a device-memory argument on a data path from an input to an output
    edge_ops: frozenset[str]  # types of the CPU-only ops that sit at the edges
    violations: tuple[Violation, ...]
    jit_violations: tuple[Violation, ...] = ()
    variable_reads: int = 0
    # Not violations: CPU-only ops between GPU ops that do not depend on the model (request checks, the
    # decoder's bookkeeping), whose small bool/int64 tensors would still cross between GPU and host.
    edge_round_trips: tuple[Violation, ...] = ()


@dataclasses.dataclass(frozen=True)
class GpuReport:
    """check_saved_model's answer: totals over the signatures, and each signature's details."""

    export_dir: str
    signatures: dict[str, SignatureReport]
    jit_compiled: bool  # the library holds a function compiled with XLA: the jit rule was checked

    @property
    def gpu_ops(self) -> int:
        return sum(s.gpu_ops for s in self.signatures.values())

    @property
    def edge_ops(self) -> frozenset[str]:
        return frozenset().union(*(s.edge_ops for s in self.signatures.values()))

    @property
    def violations(self) -> tuple[Violation, ...]:
        return tuple(v for s in self.signatures.values() for v in (*s.violations, *s.jit_violations))

    def __str__(self) -> str:
        edges = ", ".join(sorted(self.edge_ops)) or "none"
        most = max(self.signatures.items(), key=lambda item: item[1].gpu_ops, default=("none", None))
        line = (f"GPU kernels: {self.gpu_ops} ops on the explanation paths of {len(self.signatures)} signatures "
                f"(most: {most[0]}, {most[1].gpu_ops if most[1] else 0}), "
                f"{len(self.edge_ops)} CPU-only op types at the edges: {edges}")
        if self.jit_compiled:
            outside = sum(len(s.jit_violations) for s in self.signatures.values())
            line += (f"; XLA: {outside} ops of the explanation outside the compiled core" if outside else
                     "; XLA: the compiled core holds every variable read and GPU op from them to the float outputs")
        if self.violations:
            line += f"; {len(self.violations)} violations"
        return line


def check_saved_model(export_dir: str | pathlib.Path, strict: bool = True, jit: bool | None = None,
                      signatures: Collection[str] | None = None) -> GpuReport:
    """The report of every signature (or of `signatures`) of the SavedModel in `export_dir` (its serve
    MetaGraph); with `strict`, GpuPlacementError when any breaks the rule (see the module's docstring).
    `jit`: whether the exporter compiled the core with XLA (None: whether any library function must be
    compiled; a backbone's own layers may hold such a function without the core being compiled)."""
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((pathlib.Path(export_dir) / "saved_model.pb").read_bytes())
    metas = [m for m in saved_model.meta_graphs if SERVE_TAG in m.meta_info_def.tags]
    if not metas:
        raise ValueError(f"{export_dir}: no MetaGraph tagged {SERVE_TAG!r}")
    meta = metas[0]
    graph = _Graph(meta.graph_def)
    if jit is None:
        jit = any(f.attr[XLA_MUST_COMPILE].b for f in meta.graph_def.library.function if XLA_MUST_COMPILE in f.attr)
    reports = {name: _check_signature(graph, name, signature, jit)
               for name, signature in sorted(meta.signature_def.items())
               if name != INIT_SIGNATURE and (signatures is None or name in signatures)}
    report = GpuReport(str(export_dir), reports, jit)
    if strict and report.violations:
        raise GpuPlacementError(_error_message(report), report)
    return report


def _error_message(report: GpuReport) -> str:
    shown = report.violations[:5]
    more = len(report.violations) - len(shown)
    return "\n".join([f"{report.export_dir}: {len(report.violations)} ops break the GPU placement rule",
                      *(f"- {v}" for v in shown), *([f"- ... and {more} more"] if more else [])])


# --- the flattened graph ----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Node:
    name: str
    function: tuple[str, ...]
    op: str
    kind: str
    compiled: bool
    inputs: list[Ref]
    in_args: list[Arg]  # per data input; [] for the nodes that stand for a call or a loop variable
    out_args: list[Arg]
    host: frozenset[str]  # host_memory_arg of the kernel that accepts it
    control: list[int]
    host_functions: tuple[str, ...] = ()  # functions it runs on the host itself (a tf.data map's function)

    def device_input(self, position: int) -> bool:
        return self.kind == GPU and position < len(self.in_args) and self._device(self.in_args[position])

    def device_output(self, index: int) -> bool:
        return self.kind == GPU and index < len(self.out_args) and self._device(self.out_args[index])

    def _device(self, arg: Arg) -> bool:
        return arg[0] not in self.host and arg[1] not in ALWAYS_HOST

    def has_device_argument(self) -> bool:
        return self.kind == GPU and any(self._device(a) for a in (*self.in_args, *self.out_args))

    def label(self) -> str:
        return f"{self.op} {self.name!r}" + (f" (in {self.function[-1]})" if self.function else "")


@dataclasses.dataclass
class _Template:
    """A function body (or the top-level graph) parsed once, however many call sites instantiate it."""

    nodes: list  # NodeDefs
    order: list[int]  # topological
    inputs: list[list[tuple[int, int]]]  # per node: (-1, argument index) or (node, output index)
    control: list[list[int]]
    names: dict[str, int]
    rets: list[tuple[int, int]]
    control_rets: list[int]
    compiled: bool


class _Graph:
    """The serve MetaGraph with its function calls flattened, instantiated lazily per top-level node."""

    def __init__(self, graph_def):
        self.library = {f.signature.name: f for f in graph_def.library.function}
        self.templates: dict[str, _Template] = {}
        self.nodes: list[_Node] = []
        self.top = self._parse(graph_def.node, None)
        self.top_outputs: dict[int, tuple] = {}
        self.top_markers: dict[int, int] = {}
        self.cpu_ops: dict[str, frozenset[str]] = {}

    # parsing

    def _args(self, op: str, attrs) -> tuple[list[Arg], list[Arg]]:
        """A node's data inputs and outputs, each as its op-def argument (lists expanded)."""
        if op in self.library:
            signature = self.library[op].signature
            return ([(a.name, a.type) for a in signature.input_arg], [(a.name, a.type) for a in signature.output_arg])
        op_def = op_def_registry.get(op)
        if op_def is None:
            return [], []
        defaults = {a.name: a.default_value for a in op_def.attr if a.HasField("default_value")}

        def attr(name):
            return attrs[name] if name in attrs else defaults.get(name)

        def expand(args):
            out = []
            for a in args:
                dtype = a.type or (attr(a.type_attr).type if a.type_attr and attr(a.type_attr) else 0)
                if a.number_attr:
                    out += [(a.name, dtype)] * attr(a.number_attr).i
                elif a.type_list_attr:
                    out += [(a.name, t) for t in attr(a.type_list_attr).list.type]
                else:
                    out.append((a.name, dtype))
            return out

        return expand(op_def.input_arg), expand(op_def.output_arg)

    def _parse(self, node_defs, function) -> _Template:
        nodes = list(node_defs)
        names = {n.name: i for i, n in enumerate(nodes)}
        arg_index = {a.name: i for i, a in enumerate(function.signature.input_arg)} if function else {}
        offsets: dict[int, dict[str, int]] = {}

        def output_offset(index: int, arg: str) -> int:
            if index not in offsets:
                table: dict[str, int] = {}
                for position, (name, _) in enumerate(self._args(nodes[index].op, nodes[index].attr)[1]):
                    table.setdefault(name, position)
                offsets[index] = table
            return offsets[index][arg]

        def ref(tensor: str) -> tuple[int, int]:
            parts = tensor.split(":")
            if len(parts) == 1 and parts[0] in arg_index:  # a function's argument
                return -1, arg_index[parts[0]]
            if len(parts) == 3:  # in a function body: "node:out_arg:index"
                index = names[parts[0]]
                return index, output_offset(index, parts[1]) + int(parts[2])
            return names[parts[0]], int(parts[1]) if len(parts) > 1 else 0  # in a graph: "node", "node:index"

        inputs, control = [], []
        for n in nodes:
            inputs.append([ref(i) for i in n.input if not i.startswith("^")])
            control.append([names[i[1:]] for i in n.input if i.startswith("^")])
        rets, control_rets, compiled = [], [], False
        if function is not None:
            rets = [ref(function.ret[a.name]) for a in function.signature.output_arg]
            control_rets = [names[function.control_ret[c]] for c in function.signature.control_output]
            compiled = XLA_MUST_COMPILE in function.attr and function.attr[XLA_MUST_COMPILE].b
        return _Template(nodes, _topological(inputs, control), inputs, control, names, rets, control_rets, compiled)

    def _template(self, name: str) -> _Template:
        if name not in self.templates:
            self.templates[name] = self._parse(self.library[name].node_def, self.library[name])
        return self.templates[name]

    # instantiation

    def _add(self, name, function, op, kind=ANY, compiled=False, inputs=(), in_args=(), out_args=(),
             host=frozenset(), control=()) -> int:
        self.nodes.append(_Node(name, function, op, kind, compiled, list(inputs), list(in_args), list(out_args),
                                host, list(control)))
        return len(self.nodes) - 1

    def call(self, name: str, args: Sequence[Ref], path: tuple[str, ...], compiled: bool
             ) -> tuple[list[Ref], list[int]]:
        """Instantiate function `name` on `args`: (its results, the nodes its completion waits for)."""
        template = self._template(name)
        outputs, markers = {}, {}
        self._instantiate(template, template.order, args, path + (name,), compiled or template.compiled,
                          outputs, markers)
        rets, waits = [], [markers[c] for c in template.control_rets]
        for r in template.rets:
            tensor, marker = _resolve(r, args, outputs)
            rets.append(tensor)
            waits += [tensor[0]] + ([marker] if marker is not None else [])
        return rets, waits

    def _instantiate(self, template: _Template, order: Iterable[int], args, path, compiled, outputs, markers):
        for local in order:
            node_def = template.nodes[local]
            data, extra = [], []
            for r in template.inputs[local]:
                tensor, marker = _resolve(r, args, outputs)
                data.append(tensor)
                if marker is not None:
                    extra.append(marker)
            control = [markers[c] for c in template.control[local]] + extra
            op, attrs = node_def.op, node_def.attr
            if op in CALL_OPS or op in self.library:
                name = attrs["f"].func.name if op in CALL_OPS else op
                inner = compiled or (XLA_MUST_COMPILE in attrs and attrs[XLA_MUST_COMPILE].b)
                rets, waits = self.call(name, data, path, inner)
                marker = self._add(node_def.name, path, op, compiled=compiled,
                                   control=control + waits + [t[0] for t in data])
                outputs[local] = ("rets", rets, marker)
            elif op in IF_OPS or op in CASE_OPS:
                branches = ([attrs["then_branch"].func.name, attrs["else_branch"].func.name] if op in IF_OPS
                            else [f.name for f in attrs["branches"].list.func])
                results = [self.call(b, data[1:], path, compiled) for b in branches]
                marker = self._add(node_def.name, path, op, compiled=compiled,
                                   control=control + [t[0] for t in data] + [w for _, ws in results for w in ws])
                merged = [self._add(f"{node_def.name}:{i}", path, op, compiled=compiled,
                                    inputs=[rets[i] for rets, _ in results], control=[marker])
                          for i in range(len(results[0][0]))]
                outputs[local] = ("rets", [(m, 0) for m in merged], marker)
            elif op in WHILE_OPS:
                loop = [self._add(f"{node_def.name}:{i}", path, op, compiled=compiled, inputs=[t])
                        for i, t in enumerate(data)]
                variables = [(v, 0) for v in loop]
                cond_rets, cond_waits = self.call(attrs["cond"].func.name, variables, path, compiled)
                body_rets, body_waits = self.call(attrs["body"].func.name, variables, path, compiled)
                for v, t in zip(loop, body_rets):
                    self.nodes[v].inputs.append(t)
                marker = self._add(node_def.name, path, op, compiled=compiled,
                                   control=control + loop + [t[0] for t in cond_rets] + cond_waits + body_waits)
                outputs[local] = ("rets", variables, marker)
            else:
                in_args, out_args = self._args(op, attrs)
                kind, host = _classify(op, compiled, _attr_key(op, attrs))
                marker = self._add(node_def.name, path, op, kind, compiled, data, in_args, out_args, host, control)
                self.nodes[marker].host_functions = _function_attrs(attrs)
                outputs[local] = ("node", marker)
            markers[local] = marker

    def cpu_ops_in(self, name: str) -> frozenset[str]:
        """The CPU-only op types a function runs, through the functions it calls: what a tf.data function
        (run on the host whatever its ops' kernels) would run on the CPU anyway."""
        if name not in self.cpu_ops and name in self.library:
            self.cpu_ops[name] = frozenset()
            found = set()
            for node_def in self.library[name].node_def:
                called = _function_attrs(node_def.attr) + ((node_def.op,) if node_def.op in self.library else ())
                found.update(*(self.cpu_ops_in(f) for f in called))
                if not called and _classify(node_def.op, False, _attr_key(node_def.op, node_def.attr))[0] == CPU:
                    found.add(node_def.op)
            self.cpu_ops[name] = frozenset(found)
        return self.cpu_ops.get(name, frozenset())

    def tensor(self, name: str) -> tuple[Ref, int | None]:
        """A top-level tensor ("node:index") of the flattened graph, and the call it waits for, if any."""
        local, index = self.top.names[name.split(":")[0]], int(name.split(":")[1]) if ":" in name else 0
        if local not in self.top_outputs:
            needed = _closure([local], lambda n: [i for i, _ in self.top.inputs[n]] + self.top.control[n])
            order = [n for n in self.top.order if n in needed and n not in self.top_outputs]
            self._instantiate(self.top, order, [], (), False, self.top_outputs, self.top_markers)
        return _resolve((local, index), [], self.top_outputs)


def _function_attrs(attrs) -> tuple[str, ...]:
    """The functions named by a node's attrs (`f`, branches, a dataset's map function, ...)."""
    names = []
    for value in attrs.values():
        if value.WhichOneof("value") == "func":
            names.append(value.func.name)
        elif value.WhichOneof("value") == "list":
            names += [f.name for f in value.list.func]
    return tuple(names)


def _resolve(r: tuple[int, int], args: Sequence[Ref], outputs: dict) -> tuple[Ref, int | None]:
    if r[0] == -1:
        return args[r[1]], None
    record = outputs[r[0]]
    if record[0] == "node":
        return (record[1], r[1]), None
    return record[1][r[1]], record[2]


def _topological(inputs: list[list[tuple[int, int]]], control: list[list[int]]) -> list[int]:
    needs = [{i for i, _ in ins if i >= 0} | set(ctl) for ins, ctl in zip(inputs, control)]
    users = collections.defaultdict(list)
    for n, deps in enumerate(needs):
        for d in deps:
            users[d].append(n)
    waiting = [len(d) for d in needs]
    ready = collections.deque(n for n, w in enumerate(waiting) if w == 0)
    order = []
    while ready:
        n = ready.popleft()
        order.append(n)
        for u in users[n]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(inputs):
        raise ValueError("a function body with a cycle")
    return order


def _closure(roots: Iterable, moves) -> set:
    """Everything reachable from `roots` (nodes or tensors) along `moves`, the roots included."""
    seen, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(moves(n))
    return seen


# --- kernels ----------------------------------------------------------------------------------------


@functools.cache
def _kernel_defs(op: str) -> tuple:
    return tuple(kernels.get_registered_kernels_for_op(op).kernel)


@functools.cache
def _constrained(op: str) -> tuple[str, ...]:
    return tuple(sorted({c.name for k in _kernel_defs(op) for c in k.constraint} | {"_kernel"}))


def _attr_key(op: str, attrs) -> tuple:
    """The attrs that decide which kernel accepts a node, hashable: the cache key of _classify."""
    return tuple((name, attrs[name].SerializeToString(deterministic=True)) for name in _constrained(op)
                 if name in attrs)


@functools.cache
def _classify(op: str, compiled: bool, key: tuple) -> tuple[str, frozenset[str]]:
    """(gpu / any / cpu, the host_memory_arg of the kernel that accepts the node)."""
    if op in NO_KERNEL or op in FORWARDING:
        return ANY, frozenset()
    attrs = {name: attr_value_pb2.AttrValue.FromString(value) for name, value in key}
    op_def = op_def_registry.get(op)
    if op_def is not None:
        for a in op_def.attr:
            if a.HasField("default_value") and a.name not in attrs:
                attrs[a.name] = a.default_value
    defs = _kernel_defs(op)
    gpu_devices = ("GPU", "XLA_GPU") if compiled else ("GPU",)
    for devices, kind in ((gpu_devices, GPU), (("DEFAULT",), ANY), (("CPU",), CPU)):
        for kernel in defs:
            if kernel.device_type in devices and _accepts(kernel, attrs):
                return kind, frozenset(kernel.host_memory_arg)
    return (CPU if defs else ANY), frozenset()


def _accepts(kernel, attrs) -> bool:
    label = attrs["_kernel"].s.decode() if "_kernel" in attrs else ""
    if kernel.label != label:
        return False
    for constraint in kernel.constraint:
        allowed = set(constraint.allowed_values.list.type)
        if not allowed:
            continue
        value = attrs.get(constraint.name)
        if value is None:
            return False
        types = [value.type] if value.WhichOneof("value") == "type" else list(value.list.type)
        if any(t not in allowed for t in types):
            return False
    return True


# --- the rules --------------------------------------------------------------------------------------


def _dtype_name(dtype: int) -> str:
    return types_pb2.DataType.Name(dtype)[3:].lower() if dtype else "?"


class _SignatureGraph:
    """One signature's flattened nodes with their consumers, and the moves the placement rule allows."""

    def __init__(self, graph: _Graph, roots: Iterable[int]):
        self.nodes = graph.nodes
        self.members = _closure(roots, lambda n: [t[0] for t in self.nodes[n].inputs] + self.nodes[n].control)
        self.consumers: dict[Ref, list[tuple[int, int]]] = collections.defaultdict(list)
        self.produced: dict[int, set[int]] = collections.defaultdict(set)
        for n in self.members:
            for position, tensor in enumerate(self.nodes[n].inputs):
                self.consumers[tensor].append((n, position))
                self.produced[tensor[0]].add(tensor[1])
        self.variable_reads = {n for n in self.members if self._reads_variable(n)}

    def _reads_variable(self, n: int) -> bool:
        node = self.nodes[n]
        if not any(dtype not in ALWAYS_HOST for _, dtype in node.out_args):
            return False
        resources = [t[0] for t, (_, dtype) in zip(node.inputs, node.in_args) if dtype == types_pb2.DT_RESOURCE]

        def through(m):
            return [] if self.nodes[m].op in VARIABLE_OPS or self.nodes[m].kind != ANY else [
                t[0] for t in self.nodes[m].inputs]

        return any(self.nodes[m].op in VARIABLE_OPS for m in _closure(resources, through))

    def on_device(self, tensor: Ref) -> bool:
        node = self.nodes[tensor[0]]
        if node.kind == GPU:
            return node.device_output(tensor[1])
        if tensor[0] in self.variable_reads and tensor[1] < len(node.out_args):
            return node.out_args[tensor[1]][1] not in NOT_ON_DEVICE
        return False

    def forward(self, tensor: Ref) -> tuple[list[Ref], list[int]]:
        """The rule's moves from a tensor: (the tensors it reaches next, the gpu nodes it reaches in device memory)."""
        following, sinks = [], []
        for n, position in self.consumers.get(tensor, ()):
            node = self.nodes[n]
            if node.device_input(position):
                sinks.append(n)
            else:
                following += [(n, k) for k in self.produced[n]
                              if node.kind != GPU or not node.device_output(k)]
        return following, sinks

    def backward(self, tensor: Ref) -> list[Ref]:
        """The moves back from a tensor: none from a device tensor, else the producer's inputs the rule allows."""
        if self.on_device(tensor):
            return []
        node = self.nodes[tensor[0]]
        return [t for position, t in enumerate(node.inputs) if node.kind != GPU or not node.device_input(position)]

    def round_trips(self, explanation_only: bool) -> set[int]:
        """The cpu nodes on a path the rule follows from a device tensor to a device-memory input of a gpu node;
        with `explanation_only`, from a device tensor that depends on the model's variables (any without)."""
        starts = [t for t in self.consumers if self.on_device(t)]
        if explanation_only and self.variable_reads:
            model = self.data_reach(self.variable_reads, forward=True)
            starts = [t for t in starts if t[0] in model]
        reached = {t[0] for t in _closure(starts, lambda t: self.forward(t)[0])}
        sinks = [t for t, users in self.consumers.items() if any(self.nodes[n].device_input(p) for n, p in users)]
        feeds = {t[0] for t in _closure(sinks, self.backward)}
        return {n for n in reached & feeds if self.nodes[n].kind == CPU}

    def explain(self, n: int) -> tuple[str, str, str]:
        """(the dtype of the device tensor a violation's input comes from, the GPU op upstream that leaves it
        there, a GPU op downstream that takes the result back)."""
        dtype, producer = "?", "?"
        found = _first(list(self.nodes[n].inputs), self.backward, self.on_device)
        if found is not None:
            args = self.nodes[found[0]].out_args
            dtype = _dtype_name(args[found[1]][1]) if found[1] < len(args) else "?"
            producer = self._gpu(found[0])
        consumer = "?"
        sink = _first([(n, k) for k in self.produced[n]], lambda t: self.forward(t)[0],
                      lambda t: bool(self.forward(t)[1]))
        if sink is not None:
            consumer = self._gpu(self.forward(sink)[1][0])
        return dtype, producer, consumer

    def _gpu(self, n: int) -> str:
        node = self.nodes[n]
        return node.label() if node.kind == GPU else f"the read of variable {node.label()}"

    def data_reach(self, roots: Iterable[int], forward: bool) -> set[int]:
        if forward:
            return _closure(roots, lambda n: [m for k in self.produced[n] for m, _ in self.consumers[(n, k)]])
        return _closure(roots, lambda n: [t[0] for t in self.nodes[n].inputs])


def _first(starts: Sequence[Ref], moves, goal) -> Ref | None:
    """The nearest tensor from `starts` (breadth first along `moves`) that meets `goal`."""
    seen, queue = set(starts), collections.deque(starts)
    while queue:
        t = queue.popleft()
        if goal(t):
            return t
        for u in moves(t):
            if u not in seen:
                seen.add(u)
                queue.append(u)
    return None


def _check_signature(graph: _Graph, name: str, signature, jit: bool) -> SignatureReport:
    outputs = [(graph.tensor(info.name), info.dtype) for info in signature.outputs.values()]
    inputs = [graph.tensor(info.name)[0][0] for info in signature.inputs.values()]
    roots = [t[0] for (t, _), _ in outputs] + [m for (_, m), _ in outputs if m is not None]
    sg = _SignatureGraph(graph, roots)
    nodes = graph.nodes
    between = sg.round_trips(explanation_only=True)
    outside = sg.round_trips(explanation_only=False) - between
    on_path = sg.data_reach(inputs, forward=True) & sg.data_reach([t[0] for (t, _), _ in outputs], forward=False)
    gpu_ops = sum(1 for n in on_path if nodes[n].has_device_argument())

    def violation(n: int, **fields) -> Violation:
        node = nodes[n]
        return Violation(name, node.name, node.function, node.op, **fields)

    def round_trip(n: int) -> Violation:
        dtype, producer, consumer = sg.explain(n)
        return violation(n, dtype=dtype, producer=producer, consumer=consumer)

    def ordered(found: Iterable[int]) -> list[int]:
        return sorted(found, key=lambda n: (nodes[n].function, nodes[n].name))

    violations = [round_trip(n) for n in ordered(between)]
    jit_violations = []
    if jit:
        for n in ordered(sg.variable_reads):
            if not nodes[n].compiled:
                dtype = ",".join(_dtype_name(d) for _, d in nodes[n].out_args)
                jit_violations.append(violation(n, dtype=dtype, reason=(
                    "reads a model variable outside the XLA-compiled core: the weights must be read inside the "
                    "compiled function (capture the variable there), or the explanation runs op by op")))
        floats = [t[0] for (t, _), dtype in outputs if dtype in FLOATS]
        path = sg.data_reach(sg.variable_reads, forward=True) & sg.data_reach(floats, forward=False)
        for n in ordered(path):
            if nodes[n].has_device_argument() and not nodes[n].compiled:
                dtype = ",".join(_dtype_name(d) for _, d in nodes[n].out_args)
                jit_violations.append(violation(n, dtype=dtype, reason=(
                    "runs on the GPU between the model's variables and a float output, outside the XLA-compiled "
                    "core: move it into the function compiled with jit_compile=True")))
    edge = [n for n in sg.members - between if nodes[n].kind == CPU]
    edge_ops = frozenset(nodes[n].op for n in edge).union(
        *(graph.cpu_ops_in(f) for n in edge for f in nodes[n].host_functions))
    return SignatureReport(name, len(sg.members), gpu_ops, edge_ops, tuple(violations), tuple(jit_violations),
                           len(sg.variable_reads), tuple(round_trip(n) for n in ordered(outside)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.gpu_kernels", description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", help="a SavedModel version directory (holds saved_model.pb)")
    parser.add_argument("--signatures", action="store_true", help="one line per signature, and the round trips "
                        "outside the explanation (request checks, decoder bookkeeping)")
    args = parser.parse_args(argv)
    report = check_saved_model(args.export_dir, strict=False)
    print(report)
    if args.signatures:
        for s in report.signatures.values():
            print(f"  {s.name}: {s.nodes} nodes, {s.gpu_ops} GPU ops, edges: {', '.join(sorted(s.edge_ops)) or 'none'}")
            for trip in s.edge_round_trips:
                print(f"    outside the explanation: {trip.op} {trip.node!r} in {trip.where}: {trip.dtype} from "
                      f"{trip.producer} to {trip.consumer}")
    for v in report.violations:
        print(f"- {v}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
