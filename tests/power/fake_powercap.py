"""A fake Linux powercap sysfs tree (``/sys/class/powercap``) built under a tmp folder."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MAX_RANGE_UJ = 262_143_328_850


def make_zone(root: Path, zone: str, name: str, energy_uj: int,
              max_range_uj: int = DEFAULT_MAX_RANGE_UJ) -> Path:
    path = root / zone
    path.mkdir(parents=True, exist_ok=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return path


def make_powercap(root: Path, *, packages: int = 1, dram: bool = True, core: bool = True,
                  energy_uj: int = 1_000_000, max_range_uj: int = DEFAULT_MAX_RANGE_UJ) -> Path:
    """Zones like a 2020s Intel server: package-N, with dram (and core) sub-zones; plus an mmio twin."""
    root.mkdir(parents=True, exist_ok=True)
    for p in range(packages):
        make_zone(root, f"intel-rapl:{p}", f"package-{p}", energy_uj, max_range_uj)
        sub = 0
        if core:
            make_zone(root, f"intel-rapl:{p}:{sub}", "core", energy_uj, max_range_uj)
            sub += 1
        if dram:
            make_zone(root, f"intel-rapl:{p}:{sub}", "dram", energy_uj, max_range_uj)
    make_zone(root, "intel-rapl-mmio:0", "package-0", energy_uj, max_range_uj)  # must be ignored
    return root


def set_energy(zone_path: Path, energy_uj: int) -> None:
    (zone_path / "energy_uj").write_text(f"{energy_uj}\n")
