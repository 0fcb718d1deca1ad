"""Launch shapes of the backward kernel on this GPU: the numbers behind backward.py's defaults.

Run on a GPU machine from the repository root: ``PYTHONPATH=. python3 ci/backward_sweep.py``. At
T = 65,536 and 262,144 (E = 128, K = 8, float32 and bfloat16 logits, with a scale) it times
``backward.launch`` alone (the path from the saved weights), as CUDA-graph replays, for a grid of
(one-hot elements a tile, rows a program), checks
each shape's gradients against the default shape's, and prints the four fastest and the two slowest.
"""

from __future__ import annotations

import itertools

import torch

from g4route import backward, configs, route, timing

# (one-hot elements a tile, rows a program) of the path from the saved weights (renormalize=True).
TILES = (1024, 2048, 4096, 8192)
ROWS_PER_PROGRAM = (8, 16, 32, 64)


def sweep(tokens: int, dtype: torch.dtype, device: torch.device) -> list[tuple[float, int, int]]:
    logits = torch.randn(tokens, 128, device=device).to(dtype)
    scale = torch.rand(128, device=device) + 0.5
    weights, ids = route(logits, 8, scale)
    grad = torch.randn(tokens, 8, device=device)

    table_one_hot = configs.load_table("cuda").backward_one_hot  # the default shape

    def launch(one_hot=table_one_hot):
        return backward.launch(grad, logits, weights, ids, scale, True, True, True, one_hot=one_hot)

    expected = launch()  # the default shape
    default_rows = backward._GPU_WEIGHTS_ROWS_PER_PROGRAM
    results = []
    try:
        for tile, rows in itertools.product(TILES, ROWS_PER_PROGRAM):
            if max(1, tile // 1024) > rows:
                continue
            backward._GPU_WEIGHTS_ROWS_PER_PROGRAM = rows
            got = launch(tile)
            torch.testing.assert_close(got[0].float(), expected[0].float(), rtol=1e-2, atol=1e-5)
            torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-3)
            results.append((timing.graph_median_us(lambda tile=tile: launch(tile), device, calls=5), tile, rows))
    finally:
        backward._GPU_WEIGHTS_ROWS_PER_PROGRAM = default_rows
    return sorted(results)


def main() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    print(torch.cuda.get_device_name(device))
    for tokens, dtype in itertools.product((65536, 262144), (torch.float32, torch.bfloat16)):
        ranked = sweep(tokens, dtype, device)
        show = [f"{us:.1f} us ({tile} one-hot a tile, {rows} rows)" for us, tile, rows in ranked[:4] + ranked[-2:]]
        print(f"T={tokens} {str(dtype).removeprefix('torch.')}: fastest {show[:4]}; slowest {show[4:]}")


if __name__ == "__main__":
    main()
