"""Sampling profiles of a worker with py-spy (optional: ``pip install py-spy``; not a konvert dependency).

``py-spy record --format raw`` writes collapsed stacks ("frame;frame;...;leaf count"). Each sample
is attributed to a layer (our code, Litestar, msgspec, asyncpg, redis, uvicorn, the event loop,
...) by the innermost frame that belongs to one: interpreter and C frames below it count for
the layer that called them, so "msgspec" is time inside msgspec's encoders and decoders wherever
they were called from.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

PROFILE_RATE_HZ = 200

# (layer, pattern on the frame's file) in the order they are tried for one frame.
LAYERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("konvert (our code)", re.compile(r"(^|/)konvert/")),
    ("litestar", re.compile(r"(^|/)litestar/")),
    ("msgspec", re.compile(r"msgspec")),
    ("asyncpg", re.compile(r"asyncpg")),
    ("redis-py", re.compile(r"(^|/)redis/")),
    ("uvicorn + httptools", re.compile(r"uvicorn|httptools")),
    ("event loop (uvloop/asyncio)", re.compile(r"uvloop|(^|/)asyncio/")),
    ("prometheus_client", re.compile(r"prometheus_client")),
    ("logging", re.compile(r"(^|/)logging/")),
    ("hashlib/json/other stdlib", re.compile(r"python3\.\d+/|\.py:")),
)
OTHER = "interpreter/kernel (no Python frame)"
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _py_spy() -> str | None:
    """py-spy on the PATH, or installed beside this Python (a virtualenv that is not activated)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


def available() -> bool:
    return _py_spy() is not None


def start(pid: int, duration_s: float, output: Path, native: bool = False) -> subprocess.Popen[bytes]:
    command = [
        _py_spy() or "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(duration_s))),
        "--rate",
        str(PROFILE_RATE_HZ),
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    # Native (C) frames need the process paused while sampling; without them py-spy need not.
    command.append("--native" if native else "--nonblocking")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen[bytes], duration_s: float) -> str:
    try:
        _, stderr = process.communicate(timeout=duration_s + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return stderr.decode(errors="replace")


def _layer(file: str) -> str | None:
    for layer, pattern in LAYERS:
        if pattern.search(file):
            return layer
    return None


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for text in stack.split(";"):
        match = _FRAME.match(text)
        frames.append((match["name"], match["file"]) if match else (text, ""))
    return frames


def _litestar_area(file: str) -> str:
    """A finer split of Litestar's share: routing, parameter parsing and DI, responses, middleware."""
    if "_asgi" in file or "routes/" in file or "router" in file:
        return "routing + ASGI handling"
    if "_kwargs" in file or "_signature" in file or "di" in file.split("/")[-1] or "params" in file:
        return "parameters, DI, signature model"
    if "response" in file or "serialization" in file or "datastructures" in file:
        return "responses, headers, serialization"
    if "middleware" in file or "guard" in file or "handlers" in file:
        return "handlers, guards, middleware"
    return "other"


def summarize(raw_path: Path, top: int = 15) -> dict[str, object]:
    """Shares of samples per layer (self and inclusive) and the hottest functions."""
    self_layers: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    litestar_areas: Counter[str] = Counter()
    leaf_functions: Counter[str] = Counter()
    konvert_functions: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = _frames(stack)
        seen_layers = set()
        seen_konvert = set()
        for name, file in frames:
            layer = _layer(file)
            if layer is not None:
                seen_layers.add(layer)
            if layer == "konvert (our code)":
                seen_konvert.add(f"{name} ({file.split('konvert/', 1)[-1]})")
        for layer in seen_layers:
            inclusive[layer] += count
        for function in seen_konvert:
            konvert_functions[function] += count
        # Innermost frame with a layer owns the sample.
        owner, owner_frame = OTHER, None
        for name, file in reversed(frames):
            layer = _layer(file)
            if layer is not None:
                owner, owner_frame = layer, (name, file)
                break
        self_layers[owner] += count
        if owner_frame is not None:
            leaf_functions[f"{owner_frame[0]} ({_short(owner_frame[1])})"] += count
            if owner == "litestar":
                litestar_areas[_litestar_area(owner_frame[1])] += count

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common()} if total else {}

    return {
        "samples": total,
        "self_percent": shares(self_layers),
        "inclusive_percent": shares(inclusive),
        "litestar_self_percent_by_area": shares(litestar_areas),
        "top_functions_self_percent": dict(list(shares(leaf_functions).items())[:top]),
        "top_konvert_functions_inclusive_percent": dict(list(shares(konvert_functions).items())[:top]),
    }


def _short(file: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file
