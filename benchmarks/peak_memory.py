"""Peak resident memory of one call, measured in a fresh process (shared by the benchmarks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def peak_resident_mb() -> float:
    """This process's peak resident memory (VmHWM) so far, in MB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def peak_memory_above_setup_mb(setup: str, call: str) -> float:
    """Run ``setup`` in a fresh Python, then report how far ``call`` raises the peak above it.

    Linux only: writing 5 to ``/proc/self/clear_refs`` resets the peak (VmHWM) to the current size,
    so what loading the model cost is not counted.

    Args:
        setup: statements run first (imports from ``benchmarks/`` work), e.g. building the model.
        call: one statement whose peak memory is measured.
    """
    code = textwrap.dedent(setup) + textwrap.dedent(
        f"""
        import peak_memory
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = peak_memory.peak_resident_mb()
        {call}
        print(peak_memory.peak_resident_mb() - before)
        """
    )
    code = 'import sys; sys.path.insert(0, "benchmarks")\n' + code
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])
