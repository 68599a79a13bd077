"""Trim an unpacked flash-attn 2 source tree to bf16 kernels of a few head dims.

The full build compiles 73 CUDA units (7 head dims x fp16/bf16 x causal/not x fwd/bwd/split),
about 50 minutes on 16 cores. Our presets need head dims 64 (llada-1b) and 128 (llada-8b) in bf16
only: 12 units. This edits, in place, `setup.py` (the list of sources) and
`csrc/flash_attn/src/static_switch.h` (the dispatch, so that no removed kernel is referenced), and
makes the other head dims and fp16 raise a clear error at call time instead of failing to link.

    python bench/flash_trim.py SRC_DIR 64 128
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_SOURCE = re.compile(r'^\s*"csrc/flash_attn/src/flash_\w+_hdim(\d+)_(fp16|bf16)\w*\.cu",\n', re.M)
_HEADDIM = re.compile(r"#define HEADDIM_SWITCH\(HEADDIM, \.\.\.\).*?\}\(\)\n", re.S)
_FP16 = re.compile(r"#define FP16_SWITCH\(COND, \.\.\.\).*?\}\(\)\n", re.S)


def _macro(lines: list[str]) -> str:
    return " \\\n".join(lines) + "\n"


def headdim_switch(dims: list[int]) -> str:
    lines = ["#define HEADDIM_SWITCH(HEADDIM, ...)", "  [&] {"]
    for i, d in enumerate(dims):
        lines += [
            f"    {'if' if i == 0 else '} else if'} (HEADDIM <= {d}) {{",
            f"      constexpr static int kHeadDim = {d};",
            "      return __VA_ARGS__();",
        ]
    lines += [
        "    }",
        f'    throw std::invalid_argument("this flash-attn build has head dims {dims} only");',
        "  }()",
    ]
    return _macro(lines)


FP16_SWITCH = _macro(
    [
        "#define FP16_SWITCH(COND, ...)",
        "  [&] {",
        '    if (COND) throw std::invalid_argument("this flash-attn build has bf16 kernels only");',
        "    using elem_type = cutlass::bfloat16_t;",
        "    return __VA_ARGS__();",
        "  }()",
    ]
)


def trim(src: Path, dims: list[int]) -> int:
    setup = src / "setup.py"
    text = setup.read_text()
    kept = 0

    def keep(m: re.Match) -> str:
        nonlocal kept
        if int(m.group(1)) in dims and m.group(2) == "bf16":
            kept += 1
            return m.group(0)
        return ""

    text = _SOURCE.sub(keep, text)
    setup.write_text(text)
    switch = src / "csrc" / "flash_attn" / "src" / "static_switch.h"
    header = switch.read_text()
    if not (_HEADDIM.search(header) and _FP16.search(header)):
        raise SystemExit(f"{switch}: HEADDIM_SWITCH / FP16_SWITCH not found (another version?)")
    header = _HEADDIM.sub(lambda _: headdim_switch(sorted(dims)), header)
    header = _FP16.sub(lambda _: FP16_SWITCH, header)
    switch.write_text(header.replace("#pragma once\n", "#pragma once\n#include <stdexcept>\n", 1))
    return kept


if __name__ == "__main__":
    root, heads = Path(sys.argv[1]), [int(d) for d in sys.argv[2:]]
    n = trim(root, heads)
    print(f"flash-attn sources trimmed to {n} CUDA units (bf16, head dims {sorted(heads)})")
    if n == 0:
        raise SystemExit("no source kept: check the head dims")
