"""The GPU price table: the shipped defaults, an override file, and every malformed line
named."""

import pytest

from mlpe.common import prices
from mlpe.common.gpus import GPU_TYPES, canonical
from mlpe.common.settings import load

GOOD = """currency: EUR
source: "our contract, 2026"
date: 2026-11-01
gpus:
  H100: {on_demand: 2.10, spot: 0.90}
  a100-80gb: {on_demand: 1.20, spot: 0}
"""


def test_the_shipped_table_prices_every_gpu_type_and_names_its_source():
    table = prices.load(load({}).prices_path)
    assert set(table.gpus) == set(GPU_TYPES)
    assert table.currency == "USD" and "AWS" in table.source and table.date.startswith("20")
    for price in table.gpus.values():
        assert 0 < price.spot < price.on_demand


def test_an_override_file_from_mlpe_prices(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text(GOOD)
    table = prices.load(load({"MLPE_PRICES": str(path)}).prices_path)
    assert table.currency == "EUR"
    assert table.per_gpu_hour("NVIDIA H100 80GB HBM3") == 2.10
    assert table.per_gpu_hour("a100", "spot") == 0.0
    with pytest.raises(prices.PriceError, match="no price for GPU 'h200': the table has"):
        table.per_gpu_hour("h200")
    with pytest.raises(prices.PriceError, match="kind must be one of on_demand, spot"):
        table.per_gpu_hour("h100", "reserved")


@pytest.mark.parametrize("change, line, says", [
    (("  H100:", "  V100:"), 5, "unknown GPU type 'V100': expected one of a100-40gb"),
    (("on_demand: 2.10", "on_demand: two"), 5, "H100: on_demand must be a price per "
                                                "GPU-hour between 0 and 1000, got 'two'"),
    (("on_demand: 2.10", "on_demand: -1"), 5, "got '-1'"),
    (("on_demand: 2.10", "on_demand: 2100"), 5, "got '2100'"),
    ((", spot: 0.90", ""), 5, "H100: spot is missing"),
    (("spot: 0.90", "spot: 0.90, reserved: 1"), 5, "H100: unknown key 'reserved'"),
    (("  a100-80gb:", "  h100-sxm:"), 6, "'h100-sxm' is priced twice"),
    (("currency: EUR", "currency: euros"), 1, "currency must be an ISO 4217 code"),
    (("date: 2026-11-01\n", ""), 1, "date is missing"),
    (("gpus:", "gpus: {"), 6, "not YAML"),  # where the parser found it
])
def test_a_malformed_table_names_its_line(tmp_path, change, line, says):
    path = tmp_path / "prices.yaml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(prices.PriceError) as err:
        prices.load(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and says in str(err.value), err.value


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(prices.PriceError, match="cannot read the price table"):
        prices.load(tmp_path / "none.yaml")


@pytest.mark.parametrize("name, gpu", [
    ("H100", "h100-sxm"), ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("a100_40gb", "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("h200", "h200"), ("Tesla V100", None)])
def test_gpu_names_and_nvml_models_are_one_type_each(name, gpu):
    assert canonical(name) == gpu
