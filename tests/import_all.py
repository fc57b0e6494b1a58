"""Import every mlpe module and print how many: `python -m tests.import_all` (what
tests/unit/test_architecture.py runs with a malformed environment)."""

import importlib
from pathlib import Path

SOURCE_ROOTS = ("services", "agents", "kernels", "proto")
SKIP = {"mlpe.cli.__main__"}  # running it is the CLI itself


def module_names(repo: Path) -> list[str]:
    """Every module of the mlpe namespace, from its files (namespace packages included,
    which pkgutil does not walk)."""
    names = []
    for root in SOURCE_ROOTS:
        for path in sorted((repo / root / "mlpe").rglob("*.py")):
            parts = path.relative_to(repo / root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if name not in SKIP:
                names.append(name)
    return names


def main() -> int:
    names = module_names(Path(__file__).resolve().parent.parent)
    for name in names:
        importlib.import_module(name)
    print(len(names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
