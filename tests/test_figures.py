"""dptq.figures on the synthetic tidy CSVs of test_report: names, files, inputs, intervals."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dptq import figures
from test_report import LAYERS, draw, write_inputs

SMALL = {"resnet18": 8}


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Three seeds, two archs (77 layers: the histogram grid subsamples), Fig. 3 for one of them."""
    paths = write_inputs(tmp_path_factory.mktemp("figures"))
    paths["paths"] = draw(paths)
    return paths


def test_figure_names():
    assert figures.figure_names(list(LAYERS), ["mobilenetv4_conv_medium", "regnetx_016"]) == [
        "fig1_table1", "fig2_layer_scan", "fig3_histograms_mobilenetv4_conv_medium",
        "fig4_corruptions_resnet18", "fig4_corruptions_mobilenetv4_conv_medium"]
    assert figures.figure_names(["resnet18"], []) == ["fig1_table1", "fig2_layer_scan", "fig4_corruptions_resnet18"]


def test_figure_kind():
    assert figures.figure_kind("fig1_table1") == ("fig1_table1", None)
    assert figures.figure_kind("fig3_histograms_regnetx_016") == ("fig3_histograms", "regnetx_016")
    assert figures.figure_kind("fig4_corruptions_resnet18") == ("fig4_corruptions", "resnet18")
    for name in ("fig3_histograms", "fig1_table1_resnet18", "fig9_other"):
        with pytest.raises(KeyError):
            figures.figure_kind(name)


def test_png_and_pdf_for_every_name(drawn):
    names = figures.figure_names(list(LAYERS), ["mobilenetv4_conv_medium"])
    assert sorted(drawn["paths"]) == sorted(drawn["figures"] / f"{n}.{f}" for n in names for f in figures.FORMATS)
    for path in drawn["paths"]:
        assert path.stat().st_size > (10_000 if path.suffix == ".png" else 5_000), path
        assert path.read_bytes()[:4] in (b"\x89PNG", b"%PDF")


def test_one_seed_and_no_histograms(tmp_path):
    paths = write_inputs(tmp_path, layers=SMALL, histogram_archs=[], seeds=(0,))
    written = draw(paths)
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{f}" for n in ("fig1_table1", "fig2_layer_scan", "fig4_corruptions_resnet18") for f in figures.FORMATS)


def test_same_inputs_same_pdf(tmp_path):
    paths = write_inputs(tmp_path, layers=SMALL, histogram_archs=[], seeds=(0, 1))
    pdfs = lambda: {p: p.read_bytes() for p in draw(paths) if p.suffix == ".pdf"}  # noqa: E731
    assert pdfs() == pdfs()  # no creation date: DVC sees no change


def test_read_concatenates_in_order(drawn):
    corr = figures.read(drawn["corruptions"], "corruptions")
    assert list(pd.unique(corr["arch"])) == list(LAYERS) and sorted(corr["seed"].unique()) == [0, 1, 2]
    assert len(corr) == sum(len(pd.read_csv(p)) for p in drawn["corruptions"])
    t1 = figures.read(drawn["tables"]["table1"], "table1")
    assert t1["highlighted"].dtype == bool and t1["cell"].iloc[0] == "I-A"


def test_missing_input_names_the_file(tmp_path):
    paths = write_inputs(tmp_path, layers=SMALL, histogram_archs=[], seeds=(0,))
    paths["corruptions"][0].unlink()
    with pytest.raises(FileNotFoundError, match=str(paths["corruptions"][0])):
        draw(paths)
    assert not paths["figures"].exists()  # nothing drawn before every input is read


def test_an_arch_without_rows_is_named(tmp_path):
    paths = write_inputs(tmp_path, layers={"resnet18": 8, "regnetx_016": 6}, histogram_archs=[], seeds=(0,))
    paths["layer_scan"] = [p for p in paths["layer_scan"] if "regnetx_016" not in str(p)]
    with pytest.raises(ValueError, match=r"layer_scan: no rows for arch\(s\) \['regnetx_016'\]"):
        draw(paths)


def test_missing_column_and_empty_file(tmp_path):
    path = tmp_path / "layer_scan.csv"
    pd.DataFrame({"seed": [0], "arch": ["resnet18"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"layer_scan.csv: missing column\(s\) \['network'"):
        figures.read([path], "layer_scan")
    pd.DataFrame(columns=figures.COLUMNS["table2"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="header but no rows"):
        figures.read(path, "table2")
    with pytest.raises(ValueError, match="no remedy files"):
        figures.read([], "remedy")


def test_labels_stay_text(tmp_path):
    path = tmp_path / "remedy.csv"
    pd.DataFrame({"seed": [0], "arch": ["resnet18"], "network": ["robust"], "setting": ["minmax"],
                  "flagged_layers": ["7"], "q_acc": [80.0], "fp_acc": [90.0]}).to_csv(path, index=False)
    assert figures.read(path, "remedy")["flagged_layers"].iloc[0] == "7"


def test_t_interval():
    values = pd.Series([1.0, 2.0, 4.0])
    lo, hi = figures.t_interval(values)
    half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
    assert (lo, hi) == pytest.approx((values.mean() - half, values.mean() + half))
    assert figures.t_interval(pd.Series([5.0])) == (5.0, 5.0)


def test_pick_layers():
    assert figures._pick_layers(list(range(1, 21))) == list(range(1, 21))
    picked = figures._pick_layers(list(range(1, 78)))
    assert len(picked) == figures.MAX_HISTOGRAM_LAYERS and picked[0] == 1 and picked[-1] == 77
    assert picked == sorted(set(picked))
