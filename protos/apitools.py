"""Tools over the .proto contract: the API reference, comment hygiene, and the breaking-change check.

python protos/apitools.py docs       write docs/api.md from the comments in the .proto files
python protos/apitools.py baseline   record protos/nanodist/v1/baseline.binpb (after a reviewed change)
python protos/apitools.py check      fail on undocumented elements or changes that break the baseline
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator

from google.protobuf import descriptor_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
API_DIR = os.path.join(HERE, "nanodist", "v1")
BASELINE = os.path.join(API_DIR, "baseline.binpb")
DOCS = os.path.join(ROOT, "docs", "api.md")

# Field numbers inside descriptor.proto, used to address SourceCodeInfo locations.
MESSAGE, ENUM, SERVICE = 4, 5, 6
FIELD, NESTED, NESTED_ENUM, ENUM_VALUE, METHOD = 2, 3, 4, 2, 2
TYPES = {v: k.removeprefix("TYPE_").lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}

Element = (
    descriptor_pb2.DescriptorProto
    | descriptor_pb2.FieldDescriptorProto
    | descriptor_pb2.EnumDescriptorProto
    | descriptor_pb2.EnumValueDescriptorProto
    | descriptor_pb2.ServiceDescriptorProto
    | descriptor_pb2.MethodDescriptorProto
)
Located = tuple[str, str, tuple[int, ...], Element]  # (kind, full name, source path, descriptor)


def compile_protos(proto_root: str = HERE) -> descriptor_pb2.FileDescriptorSet:
    """Compile every nanodist/v1/*.proto under `proto_root`, keeping comments."""
    sources = sorted(
        f"nanodist/v1/{n}" for n in os.listdir(os.path.join(proto_root, "nanodist", "v1")) if n.endswith(".proto")
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.binpb")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{proto_root}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *sources,
            ],
            check=True,
        )
        with open(out, "rb") as f:
            return descriptor_pb2.FileDescriptorSet.FromString(f.read())


def _comments(proto: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    found = {}
    for location in proto.source_code_info.location:
        text = (location.leading_comments or location.trailing_comments).strip()
        if text:
            found[tuple(location.path)] = " ".join(line.strip() for line in text.splitlines())
    return found


def _elements(proto: descriptor_pb2.FileDescriptorProto) -> Iterator[Located]:
    """(kind, full name, source path, descriptor) of every documentable element of a file."""
    package = proto.package

    def messages(
        items: Iterable[descriptor_pb2.DescriptorProto], prefix: str, path: tuple[int, ...], tag: int
    ) -> Iterator[Located]:
        for i, message in enumerate(items):
            name, here = f"{prefix}.{message.name}", (*path, tag, i)
            yield "message", name, here, message
            for j, field in enumerate(message.field):
                yield "field", f"{name}.{field.name}", (*here, FIELD, j), field
            yield from enums(message.enum_type, name, here, NESTED_ENUM)
            yield from messages(message.nested_type, name, here, NESTED)

    def enums(
        items: Iterable[descriptor_pb2.EnumDescriptorProto], prefix: str, path: tuple[int, ...], tag: int
    ) -> Iterator[Located]:
        for i, enum in enumerate(items):
            name, here = f"{prefix}.{enum.name}", (*path, tag, i)
            yield "enum", name, here, enum
            for j, value in enumerate(enum.value):
                yield "enum value", f"{name}.{value.name}", (*here, ENUM_VALUE, j), value

    yield from messages(proto.message_type, package, (), MESSAGE)
    yield from enums(proto.enum_type, package, (), ENUM)
    for i, service in enumerate(proto.service):
        name = f"{package}.{service.name}"
        yield "service", name, (SERVICE, i), service
        for j, method in enumerate(service.method):
            yield "rpc", f"{name}.{method.name}", (SERVICE, i, METHOD, j), method


def undocumented(files: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """Elements without a comment, and enums whose zero value is not *_UNSPECIFIED."""
    problems = []
    for proto in files.file:
        comments = _comments(proto)
        for kind, name, path, element in _elements(proto):
            if path not in comments:
                problems.append(f"{proto.name}: {kind} {name} has no comment")
            if isinstance(element, descriptor_pb2.EnumDescriptorProto) and not element.value[0].name.endswith(
                "UNSPECIFIED"
            ):
                problems.append(f"{proto.name}: enum {name} must start with a zero *_UNSPECIFIED value")
    return problems


def _field_type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    base = field.type_name.lstrip(".") if field.type_name else TYPES[field.type]
    return f"repeated {base}" if field.label == field.LABEL_REPEATED else base


def breaking_changes(old: descriptor_pb2.FileDescriptorSet, new: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """Changes that break existing clients: removed or renumbered fields, changed types, removed RPCs."""

    def index(files: descriptor_pb2.FileDescriptorSet) -> dict[str, Element]:
        return {
            name: element
            for proto in files.file
            for kind, name, _, element in _elements(proto)
            if kind in ("message", "enum", "service")
        }

    before, after = index(old), index(new)
    problems = []
    for name, element in before.items():
        if name not in after:
            problems.append(f"{name} was removed")
            continue
        now = after[name]
        if type(now) is not type(element):
            problems.append(f"{name} changed kind")
        elif isinstance(element, descriptor_pb2.DescriptorProto) and isinstance(now, descriptor_pb2.DescriptorProto):
            problems += _message_changes(name, element, now)
        elif isinstance(element, descriptor_pb2.EnumDescriptorProto) and isinstance(
            now, descriptor_pb2.EnumDescriptorProto
        ):
            values = {v.name: v.number for v in now.value}
            for value in element.value:
                if values.get(value.name) != value.number:
                    problems.append(f"{name}.{value.name} was removed or renumbered")
        elif isinstance(element, descriptor_pb2.ServiceDescriptorProto) and isinstance(
            now, descriptor_pb2.ServiceDescriptorProto
        ):
            problems += _service_changes(name, element, now)
    return problems


def _message_changes(name: str, old: descriptor_pb2.DescriptorProto, new: descriptor_pb2.DescriptorProto) -> list[str]:
    problems = []
    fields = {f.number: f for f in new.field}
    reserved = [(r.start, r.end) for r in new.reserved_range]
    for field in old.field:
        current = fields.get(field.number)
        if current is None:
            if not any(start <= field.number < end for start, end in reserved):
                problems.append(f"{name}.{field.name} (field {field.number}) was removed without reserving it")
        elif current.name != field.name:
            problems.append(f"{name}: field {field.number} was renamed {field.name} -> {current.name}")
        elif _field_type(current) != _field_type(field):
            problems.append(f"{name}.{field.name} changed type {_field_type(field)} -> {_field_type(current)}")
    return problems


def _service_changes(
    name: str, old: descriptor_pb2.ServiceDescriptorProto, new: descriptor_pb2.ServiceDescriptorProto
) -> list[str]:
    problems = []
    methods = {m.name: m for m in new.method}
    for method in old.method:
        current = methods.get(method.name)
        if current is None:
            problems.append(f"{name}.{method.name} was removed")
        elif (current.input_type, current.output_type, current.client_streaming, current.server_streaming) != (
            method.input_type,
            method.output_type,
            method.client_streaming,
            method.server_streaming,
        ):
            problems.append(f"{name}.{method.name} changed its signature")
    return problems


def render(files: descriptor_pb2.FileDescriptorSet) -> str:
    lines = [
        "# nanodist.v1 API reference",
        "",
        "Generated by `make docs` from the comments in `protos/nanodist/v1/*.proto`; do not edit by hand.",
        "Every RPC lists its guarantees, its idempotency and the status codes it returns.",
        "",
    ]
    for proto in sorted(files.file, key=lambda p: p.name):
        comments = _comments(proto)
        elements = list(_elements(proto))
        lines += [f"## {os.path.basename(proto.name)}", ""]
        for kind, name, path, element in elements:
            text = comments.get(path, "")
            if kind == "service":
                lines += [f"### service `{name}`", "", text, ""]
            elif isinstance(element, descriptor_pb2.MethodDescriptorProto):
                request = ("stream " if element.client_streaming else "") + element.input_type.rsplit(".", 1)[-1]
                response = ("stream " if element.server_streaming else "") + element.output_type.rsplit(".", 1)[-1]
                lines += [f"#### `{element.name}({request}) returns ({response})`", "", text, ""]
        for kind, name, path, element in elements:
            text = comments.get(path, "")
            if isinstance(element, descriptor_pb2.DescriptorProto):
                lines += [f"### {kind} `{name}`", "", text, ""]
                if element.field:
                    lines += ["| field | number | type | meaning |", "|---|---:|---|---|"]
                    lines += [
                        f"| `{f.name}` | {f.number} | `{_field_type(f)}` | {comments.get((*path, FIELD, j), '')} |"
                        for j, f in enumerate(element.field)
                    ]
                    lines.append("")
            elif isinstance(element, descriptor_pb2.EnumDescriptorProto):
                lines += [f"### {kind} `{name}`", "", text, ""]
                lines += ["| value | number | meaning |", "|---|---:|---|"]
                lines += [
                    f"| `{v.name}` | {v.number} | {comments.get((*path, ENUM_VALUE, j), '')} |"
                    for j, v in enumerate(element.value)
                ]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _strip_comments(files: descriptor_pb2.FileDescriptorSet) -> descriptor_pb2.FileDescriptorSet:
    stripped = descriptor_pb2.FileDescriptorSet()
    stripped.CopyFrom(files)
    for proto in stripped.file:
        proto.ClearField("source_code_info")
    return stripped


def main(command: str) -> int:
    files = compile_protos()
    if command == "docs":
        os.makedirs(os.path.dirname(DOCS), exist_ok=True)
        with open(DOCS, "w") as f:
            f.write(render(files))
        print(f"wrote {os.path.relpath(DOCS, ROOT)}")
        return 0
    if command == "baseline":
        with open(BASELINE, "wb") as f:
            f.write(_strip_comments(files).SerializeToString(deterministic=True))
        print(f"wrote {os.path.relpath(BASELINE, ROOT)}")
        return 0
    with open(BASELINE, "rb") as f:
        baseline = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    problems = undocumented(files) + breaking_changes(baseline, files)
    print("\n".join(problems) or "protos: documented, and compatible with the baseline")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "check"))
