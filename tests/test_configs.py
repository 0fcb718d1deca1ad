"""The tuned tables: parsing, family matching, bucket choice, errors that name the file, shipped tables."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import g4route
from g4route import configs
from g4route.kernel import LaunchConfig

SOURCE = "simulated/rocm-test.toml"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VENDORS = ["cuda", "rocm", "xpu", "interpreter"]
REPO_TABLES = Path(__file__).resolve().parent.parent / "backends"

TABLE = """
vendor = "rocm"

[[family]]
name = "mi300"
match = ["gfx942"]
buckets = [
  { max_tokens = 64, rows_per_program = 1, num_warps = 1 },
  { max_tokens = 1024, dtypes = ["bfloat16"], rows_per_program = 2, num_warps = 2 },
  { rows_per_program = 8, num_warps = 4 },
]

[[family]]
name = "rdna3"
match = ["gfx11", "Radeon"]
buckets = [{ rows_per_program = 4, num_warps = 8, num_stages = 3 }]

[default]
buckets = [{ rows_per_program = 16, num_warps = 4 }]
"""


@pytest.fixture(scope="module")
def table():
    return configs.parse_table(TABLE, SOURCE)


def _parse(text: str):
    return configs.parse_table(textwrap.dedent(text), SOURCE)


# --------------------------------------------------------------------------------------- family matching


@pytest.mark.parametrize(
    ("names", "family"),
    [
        (["AMD Instinct MI300X", "gfx942"], "mi300"),
        (["AMD Instinct MI300X", "GFX942"], "mi300"),  # case-insensitive on the device side
        (["AMD Radeon RX 7900 XTX", "gfx1100"], "rdna3"),  # substring of the arch
        (["amd radeon pro w7900"], "rdna3"),  # case-insensitive on the table side ("Radeon")
        (["gfx942", "AMD Radeon"], "mi300"),  # both match: families are tried in order
        (["AMD Instinct MI250X", "gfx90a"], "default"),
        (["NVIDIA H100 80GB HBM3"], "default"),
        ([], "default"),
    ],
    ids=str,
)
def test_family_by_device_names(table, names, family):
    assert table.family_for(names).name == family


def test_parsed_table_records(table):
    assert table.vendor == "rocm" and table.source == SOURCE
    assert [f.name for f in table.families] == ["mi300", "rdna3"]
    assert table.families[0].match == ("gfx942",)
    rdna3 = table.families[1].buckets[0].config
    assert rdna3 == LaunchConfig(rows_per_program=4, num_warps=8, num_stages=3)
    # num_stages is optional and defaults to LaunchConfig's own default.
    assert table.default.buckets[0].config == LaunchConfig(rows_per_program=16, num_warps=4)


def test_family_without_a_name_is_named_by_position():
    t = _parse("""
        [[family]]
        match = ["x"]
        buckets = [{ rows_per_program = 1, num_warps = 1 }]
        [default]
        buckets = [{ rows_per_program = 1, num_warps = 1 }]
    """)
    assert t.families[0].name == "#0"


# ------------------------------------------------------------------------------------------ bucket choice


@pytest.mark.parametrize(
    ("tokens", "dtype", "rows"),
    [
        (1, torch.float32, 1),
        (64, torch.bfloat16, 1),  # max_tokens is inclusive
        (65, torch.bfloat16, 2),
        (1024, torch.bfloat16, 2),
        (1025, torch.bfloat16, 8),
        (65, torch.float32, 8),  # the bf16-only row does not serve other dtypes
        (65, torch.float16, 8),
        (1 << 20, torch.float16, 8),
    ],
    ids=str,
)
def test_bucket_by_tokens_and_dtype(table, tokens, dtype, rows):
    mi300 = table.family_for(["gfx942"])
    assert mi300.config_for(tokens, dtype).rows_per_program == rows


def test_first_serving_bucket_wins():
    t = _parse("""
        [default]
        buckets = [
          { max_tokens = 100, rows_per_program = 1, num_warps = 1 },
          { max_tokens = 50, rows_per_program = 2, num_warps = 1 },
          { rows_per_program = 4, num_warps = 1 },
        ]
    """)
    assert t.default.config_for(10, torch.float32).rows_per_program == 1
    assert t.default.config_for(101, torch.float32).rows_per_program == 4


# ----------------------------------------------------------------------------------------------- errors

_CATCH_ALL = "{ rows_per_program = 1, num_warps = 1 }"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f'vendor = "x"\n[[family]]\nname = "a"\nmatch = ["a"]\nbuckets = [{_CATCH_ALL}]\n', r"\[default\]"),
        ("[default]\nbuckets = []\n", "no buckets"),
        ("[default]\nprovenance = 'x'\n", "no buckets"),
        (f'[[family]]\nname = "a"\nmatch = ["a"]\n[default]\nbuckets = [{_CATCH_ALL}]\n', "'a' has no buckets"),
        ("[default]\nbuckets = [{ max_tokens = 64, rows_per_program = 1, num_warps = 1 }]\n", "last bucket"),
        ("[default]\nbuckets = [{ dtypes = ['float32'], rows_per_program = 1, num_warps = 1 }]\n", "last bucket"),
        ("[default]\nbuckets = [{ rows_per_program = 1, num_warps = 3 }]\n", "num_warps must be a power of two"),
        ("[default]\nbuckets = [{ rows_per_program = 1, num_warps = 0 }]\n", "num_warps must be a power of two"),
        ("[default]\nbuckets = [{ rows_per_program = 6, num_warps = 1 }]\n", "rows_per_program must be a power"),
        ("[default]\nbuckets = [{ rows_per_program = 1, num_warp = 1 }]\n", r"unknown keys \['num_warp'\]"),
        ("[default]\nbuckets = [{ rows_per_program = 1 }]\n", "missing 'num_warps'"),
        ("[default]\nbuckets = [{ rows_per_program = 1, num_warps = 1, lanes_per_row = 3 }]\n",
         "lanes_per_row must be 0"),
        ("[default]\nbuckets = [{ rows_per_program = 1, num_warps = 1, lanes_per_row = -2 }]\n",
         "lanes_per_row must be 0"),
        ("[default]\nbuckets = [{ dtypes = ['float64'], rows_per_program = 1, num_warps = 1 }, "
         f"{_CATCH_ALL}]\n", r"unknown dtypes \['float64'\]"),
        (f"backward_one_hot = 3000\n[default]\nbuckets = [{_CATCH_ALL}]\n", "backward_one_hot must be a power"),
        (f"backward_scatter = 1\n[default]\nbuckets = [{_CATCH_ALL}]\n", "backward_scatter must be true or false"),
        (f"router_squares_by_dot = 'yes'\n[default]\nbuckets = [{_CATCH_ALL}]\n",
         "router_squares_by_dot must be true or false"),
    ],
    ids=["no-default", "empty-buckets", "no-buckets-key", "family-no-buckets", "no-catch-all-max-tokens",
         "no-catch-all-dtypes", "num-warps-3", "num-warps-0", "rows-6", "unknown-key", "missing-key",
         "lanes-3", "lanes-negative", "unknown-dtype", "one-hot-3000", "scatter-int", "squares-str"],
)
def test_errors_name_the_source(text, match):
    with pytest.raises(ValueError, match=match) as info:
        configs.parse_table(text, SOURCE)
    assert str(info.value).startswith(SOURCE), str(info.value)


def test_bucket_errors_name_the_family_and_row():
    with pytest.raises(ValueError, match=r"\[mi300\] bucket 1") as info:
        _parse(f"""
            [[family]]
            name = "mi300"
            match = ["gfx942"]
            buckets = [{_CATCH_ALL}, {{ rows_per_program = 1, num_warps = 5 }}]
            [default]
            buckets = [{_CATCH_ALL}]
        """)
    assert SOURCE in str(info.value)


def test_unknown_family_key_is_an_error():
    with pytest.raises(ValueError, match="mach"):
        _parse(f"""
            [[family]]
            name = "mi300"
            mach = ["gfx942"]
            buckets = [{_CATCH_ALL}]
            [default]
            buckets = [{_CATCH_ALL}]
        """)


def test_rows_after_the_catch_all_are_an_error():
    with pytest.raises(ValueError, match="last bucket"):
        _parse(f"""
            [default]
            buckets = [{_CATCH_ALL}, {{ max_tokens = 64, rows_per_program = 2, num_warps = 1 }}]
        """)


# ------------------------------------------------------------------------------------------ shipped tables


def _bucket_edges(table) -> list[int]:
    """T = 1 and 2**18 and both sides of every bucket edge: the choice is constant between edges."""
    edges = {1, 1 << 18}
    for family in (*table.families, table.default):
        for bucket in family.buckets:
            if bucket.max_tokens is not None:
                edges |= {t for t in (bucket.max_tokens, bucket.max_tokens + 1) if 1 <= t <= 1 << 18}
    return sorted(edges)


@pytest.mark.parametrize("vendor", VENDORS)
def test_shipped_table_serves_every_token_count(vendor):
    table = configs.load_table(vendor)
    assert table.vendor == vendor
    assert Path(table.source).name == f"{vendor}.toml"
    assert table.default.provenance, f"{table.source}: the default family should say where its numbers come from"
    for family in (*table.families, table.default):
        for dtype in DTYPES:
            for tokens in _bucket_edges(table):
                config = family.config_for(tokens, dtype)
                assert isinstance(config, LaunchConfig)
                assert config in [b.config for b in family.buckets if b.serves(tokens, configs._DTYPE_NAMES[dtype])]


def test_tables_dir_holds_every_vendor_table():
    for vendor in VENDORS:
        assert (configs.tables_dir() / f"{vendor}.toml").is_file()


def test_tables_found_in_a_non_editable_install():
    where = configs.tables_dir().resolve()
    if where == REPO_TABLES.resolve():
        pytest.skip(f"g4route runs from the source tree ({where}); this check needs a non-editable install "
                    "(pip install . into a venv, then run the tests from outside the checkout)")
    assert any(part in ("site-packages", "dist-packages") for part in where.parts), where
    # The wheel carries the tables as the g4route.tables package, next to the installed g4route code.
    assert where.parent == Path(g4route.__file__).resolve().parent
    for vendor in VENDORS:
        assert (where / f"{vendor}.toml").is_file()
        assert Path(configs.load_table(vendor).source).resolve().parent == where


def test_finding_the_tables_keeps_the_public_backends_function():
    # Installed, the tables are the subpackage g4route.tables; importing it must not replace the
    # public function g4route.backends() with the module (Python binds a submodule on its parent).
    configs.tables_dir()
    assert callable(g4route.backends), f"g4route.backends is {g4route.backends!r}"
    assert g4route.backends() == list(g4route.registry.BACKENDS)


def test_backward_keys_are_read_and_default_to_the_one_hot():
    text = f"[default]\nbuckets = [{_CATCH_ALL}]\n"
    plain = configs.parse_table(text, SOURCE)
    assert (plain.backward_one_hot, plain.backward_scatter) == (configs.BACKWARD_ONE_HOT, False)
    tuned = configs.parse_table("backward_one_hot = 1024\nbackward_scatter = true\n" + text, SOURCE)
    assert (tuned.backward_one_hot, tuned.backward_scatter) == (1024, True)
    assert configs.load_table("cuda").backward_scatter and not configs.load_table("rocm").backward_scatter
    assert not plain.router_squares_by_dot
    assert configs.parse_table("router_squares_by_dot = true\n" + text, SOURCE).router_squares_by_dot
    assert configs.load_table("cuda").router_squares_by_dot and not configs.load_table("xpu").router_squares_by_dot


def test_lanes_per_row_is_read_and_defaults_to_a_whole_row():
    table = _parse("""
        [default]
        buckets = [{ max_tokens = 8, rows_per_program = 16, num_warps = 1, lanes_per_row = 2 },
                   { rows_per_program = 4, num_warps = 1 }]
    """)
    assert table.default.config_for(8, torch.bfloat16) == LaunchConfig(16, 1, 1, 2)
    assert table.default.config_for(9, torch.bfloat16).lanes_per_row == 0
    # Lanes of 16-byte vectors: 2 lanes hold 16 bfloat16 or 8 float32 columns of a chunk; 0 is the whole row.
    assert LaunchConfig(16, 1, 1, 2).chunk(128, 2) == 16 and LaunchConfig(16, 1, 1, 2).chunk(128, 4) == 8
    assert LaunchConfig(4, 1).chunk(128, 4) == 128 and LaunchConfig(4, 1, 1, 64).chunk(128, 2) == 128


def test_tune_candidates_keep_rows_whole_within_a_warp():
    """Every candidate either has one row or gives each warp whole rows, and none repeats another's tile."""
    from g4route import tune

    for itemsize in (4, 2):
        for tokens in (1, 16, 256, 262144):
            found = tune.candidates(tokens, 128, (1,), itemsize)
            assert found and len(set(found)) == len(found)
            for cfg in found:
                if cfg.lanes_per_row:
                    assert cfg.chunk(128, itemsize) < 128, cfg
                    assert cfg.rows_per_program == 1 or cfg.rows_per_program * cfg.lanes_per_row >= 32 * cfg.num_warps
                assert cfg.rows_per_program <= max(1, 1 << (tokens - 1).bit_length())
