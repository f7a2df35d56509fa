"""The options several commands share, declared once: the same flag means the same thing, with the
same help, in ``merge``, ``eval``, ``inspect`` and ``demo``.

    def command(arch: ArchOption = None, arch_opt: ArchOptOption = None, device: DeviceOption = "auto",
                as_json: JsonOption = False) -> None: ...
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ArchOption = Annotated[
    Optional[str],
    typer.Option("--arch", "-a", help="Registered architecture name or alias (mudsc inspect --list), package.module:factory or "
                 "timm:NAME; for checkpoint files (a Hugging Face model directory's config.json names its class).", show_default=False),
]
ArchOptOption = Annotated[
    Optional[list[str]],
    typer.Option("--arch-opt", "-o", metavar="KEY=VALUE", help="Option for the architecture's factory, e.g. num_classes=10; the value "
                 "is read as a Python literal, else as a string. Repeat for several.", show_default=False),
]
DeviceOption = Annotated[str, typer.Option("--device", help="Where to compute: auto (CUDA when available), cpu or cuda.")]
InputShapeOption = Annotated[
    Optional[str], typer.Option("--input-shape", help="Shape of one input, e.g. 3,32,32; needed only for a package.module:factory --arch.")
]
MaxLengthOption = Annotated[
    int, typer.Option("--max-length", min=1, help="Text data for a Hugging Face model: at most this many tokens per line (lines are "
                      "padded to the longest).")
]
TrustPickleOption = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow checkpoints that contain pickled Python objects; this executes their code, so only "
                       "for trusted files.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout instead of a table.")]
