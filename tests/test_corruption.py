"""kdcli.data.corruption: hashing, noise and imbalance specs, their statistics, measurement, bad specs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcli.data.corruption import (
    class_counts,
    keep_mask,
    memorisation,
    noise_report,
    noisy_labels,
    parse_imbalance,
    parse_noise,
    target_counts,
    transition_matrix,
    uniform,
)
from kdcli.errors import KdcliError

C = 10
N = 20_000


@pytest.fixture(scope="module")
def split():
    """A balanced 20k-example, 10-class label array with its original indices."""
    labels = np.arange(N) % C
    np.random.default_rng(0).shuffle(labels)
    return labels, np.arange(N)


def _realised(spec_text: str, split, seed: int = 0, num_classes: int = C):
    labels, indices = split
    spec = parse_noise(spec_text, num_classes)
    noisy = noisy_labels(spec, labels, indices, num_classes, seed=seed)
    return noisy, np.array(transition_matrix(labels, noisy, num_classes))


# ------------------------------------------------------------------------------------------------ hashing


def test_uniform_is_pure_and_uniform():
    idx = np.arange(100_000)
    u = uniform(3, idx, "a")
    assert u.dtype == np.float64 and u.shape == idx.shape
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 9_500
    np.testing.assert_array_equal(u, uniform(3, idx, "a"))
    np.testing.assert_array_equal(u[[7, 99_999, 5]], uniform(3, np.array([7, 99_999, 5]), "a"))
    assert float(uniform(3, 7, "a")) == u[7]
    assert not np.array_equal(u, uniform(4, idx, "a"))
    assert not np.array_equal(u, uniform(3, idx, "b"))
    assert abs(np.corrcoef(u, uniform(3, idx, "b"))[0, 1]) < 0.02
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02
    assert uniform(-1, idx[:3], 0).shape == (3,)


# ------------------------------------------------------------------------------------------------ noise


def test_noise_is_deterministic_and_streamable(split):
    labels, indices = split
    spec = parse_noise("symmetric:0.4", C)
    a = noisy_labels(spec, labels, indices, C, seed=1)
    np.testing.assert_array_equal(a, noisy_labels(spec, labels, indices, C, seed=1))
    assert not np.array_equal(a, noisy_labels(spec, labels, indices, C, seed=2))
    # Streamed: any subset, in any order, one at a time, gives the entries computed on the whole split.
    subset = np.random.default_rng(5).permutation(N)[:500]
    np.testing.assert_array_equal(noisy_labels(spec, labels[subset], indices[subset], C, seed=1), a[subset])
    for i in subset[:20]:
        assert int(noisy_labels(spec, labels[i], indices[i], C, seed=1)) == a[i]


def test_noise_flips_are_nested_across_rates(split):
    labels, indices = split
    low = noisy_labels(parse_noise("symmetric:0.2", C), labels, indices, C)
    high = noisy_labels(parse_noise("symmetric:0.4", C), labels, indices, C)
    flipped_low = low != labels
    assert np.all(high[flipped_low] != labels[flipped_low])
    np.testing.assert_array_equal(high[flipped_low], low[flipped_low])


def test_symmetric_excludes_the_true_class(split):
    labels, _ = split
    noisy, matrix = _realised("symmetric:0.4", split)
    assert abs(np.mean(noisy != labels) - 0.40) < 0.01
    np.testing.assert_allclose(np.diag(matrix), 0.6, atol=0.03)
    off = matrix[~np.eye(C, dtype=bool)]
    np.testing.assert_allclose(off, 0.4 / 9, atol=0.02)  # 2000 per class: one cell's sd is 0.005
    assert np.all(noisy_labels(parse_noise("symmetric:1", C), labels, split[1], C) != labels)
    np.testing.assert_array_equal(noisy_labels(parse_noise("symmetric:0", C), labels, split[1], C), labels)


def test_symmetric_incl_realises_r_times_c_minus_1_over_c(split):
    labels, _ = split
    noisy, matrix = _realised("symmetric-incl:0.5", split)
    assert abs(np.mean(noisy != labels) - 0.5 * 9 / 10) < 0.01
    np.testing.assert_allclose(np.diag(matrix), 1 - 0.5 + 0.05, atol=0.03)
    spec = parse_noise("symmetric-incl:0.5", C)
    assert spec.expected_rate == pytest.approx(0.45)


def test_pairflip_goes_to_the_next_class_only(split):
    labels, _ = split
    noisy, matrix = _realised("pairflip:0.3", split)
    assert abs(np.mean(noisy != labels) - 0.3) < 0.01
    allowed = np.eye(C, dtype=bool) | np.roll(np.eye(C, dtype=bool), 1, axis=1)
    assert np.all(matrix[~allowed] == 0)
    np.testing.assert_allclose(matrix[np.roll(np.eye(C, dtype=bool), 1, axis=1)], 0.3, atol=0.03)
    assert matrix[9, 0] > 0.2  # wraps around


def test_asymmetric_uses_the_cifar10_map(split):
    labels, _ = split
    noisy, matrix = _realised("asymmetric:0.4", split)
    expected = np.eye(C)
    for src, dst in {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}.items():
        expected[src, src], expected[src, dst] = 0.6, 0.4
    assert np.all(matrix[expected == 0] == 0)
    np.testing.assert_allclose(matrix, expected, atol=0.04)
    assert abs(np.mean(noisy != labels) - 0.4 * 5 / 10) < 0.01


def test_asymmetric_with_a_class_map_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"0": 2, "1": 0}))
    labels = np.arange(3_000) % 3
    spec = parse_noise(f"asymmetric:0.5:{path}", 3)
    matrix = np.array(transition_matrix(labels, noisy_labels(spec, labels, np.arange(3_000), 3), 3))
    assert matrix[0, 1] == 0 and matrix[1, 2] == 0 and matrix[2, 2] == 1
    assert abs(matrix[0, 2] - 0.5) < 0.05 and abs(matrix[1, 0] - 0.5) < 0.05


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_matrix_file_is_realised(tmp_path, fmt):
    rng = np.random.default_rng(1)
    target = rng.dirichlet(np.ones(C) * 0.5, size=C)
    target = 0.5 * np.eye(C) + 0.5 * target
    target[3] = 0
    target[3, 3] = 1.0  # a row that never flips
    path = tmp_path / f"t.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(target.tolist()))
    else:
        path.write_text("\n".join(",".join(repr(float(v)) for v in row) for row in target) + "\n")
    labels = np.arange(100_000) % C  # 10k per class: a cell's sd is at most 0.005, so 0.02 is 4 sd
    noisy, matrix = _realised(f"matrix:{path}", (labels, np.arange(labels.size)))
    np.testing.assert_allclose(matrix, target, atol=0.02)
    assert np.all(matrix[target == 0] == 0)
    assert np.all(noisy[labels == 3] == 3)


def test_noise_report_and_transition_matrix():
    clean = np.array([0, 0, 1, 1, 1, 2])
    noisy = np.array([0, 1, 1, 1, 0, 2])
    report = noise_report(clean, noisy, 4)
    assert report["num_examples"] == 6 and report["num_changed"] == 2
    assert report["noise_rate"] == pytest.approx(2 / 6)
    assert report["counts_clean"] == [2, 3, 1, 0] and report["counts_noisy"] == [2, 3, 1, 0]
    assert report["transition_matrix"][0] == [0.5, 0.5, 0.0, 0.0]
    assert report["transition_matrix"][1] == pytest.approx([1 / 3, 2 / 3, 0, 0])
    assert report["transition_matrix"][3] == [0.0, 0.0, 0.0, 0.0]
    json.dumps(report)


# ------------------------------------------------------------------------------------------------ imbalance


def _kept_counts(spec_text: str, split, class_order=None, seed: int = 0):
    labels, indices = split
    spec = parse_imbalance(spec_text, C, class_order)
    keep = keep_mask(spec, labels, indices, C, seed=seed)
    return spec, keep, np.array(class_counts(labels[keep], C))


def test_longtail_exponential_profile(split):
    spec, keep, counts = _kept_counts("longtail:100", split)
    assert counts[0] == N // C == counts.max()
    assert counts.max() / counts.min() == pytest.approx(100, rel=0.05)
    expected = (N // C) * 100.0 ** (-np.arange(C) / (C - 1))
    assert np.all(np.abs(counts - expected) <= 1)
    assert list(np.argsort(-counts)) == list(range(C))
    assert counts.tolist() == target_counts(spec, class_counts(split[0], C))


def test_step_has_two_levels(split):
    spec, _, counts = _kept_counts("step:10:0.5", split)
    assert spec.num_minority == 5
    assert counts[:5].tolist() == [2000] * 5 and counts[5:].tolist() == [200] * 5
    assert parse_imbalance("step:10:0.3", C).num_minority == 3
    assert parse_imbalance("step:10:0.01", C).num_minority == 1
    assert parse_imbalance("step:10:0.99", C).num_minority == 9


def test_keep_mask_is_pure_and_exact(split):
    labels, indices = split
    spec = parse_imbalance("longtail:10", C)
    keep = keep_mask(spec, labels, indices, C, seed=3)
    np.testing.assert_array_equal(keep, keep_mask(spec, labels, indices, C, seed=3))
    assert not np.array_equal(keep, keep_mask(spec, labels, indices, C, seed=4))
    # Independent of the order the examples come in.
    perm = np.random.default_rng(2).permutation(N)
    np.testing.assert_array_equal(keep_mask(spec, labels[perm], indices[perm], C, seed=3), keep[perm])


def test_imbalance_class_order(split):
    order = [3, 1, 0, 2, 9, 8, 7, 6, 5, 4]
    _, _, counts = _kept_counts("longtail:100", split, class_order=",".join(map(str, order)))
    assert list(np.argsort(-counts, kind="stable")) == order
    _, _, same = _kept_counts("longtail:100", split, class_order=json.dumps(order))
    np.testing.assert_array_equal(counts, same)
    spec = parse_imbalance("longtail:100", C, "random:7")
    assert sorted(spec.order) == list(range(C)) and list(spec.order) != list(range(C))
    assert spec.order == parse_imbalance("longtail:100", C, "random:7").order
    assert spec.order != parse_imbalance("longtail:100", C, "random:8").order
    _, _, counts = _kept_counts("longtail:100", split, class_order="random:7")
    assert tuple(np.argsort(-counts, kind="stable")) == spec.order
    assert parse_imbalance("step:5:0.5", C, order).order == tuple(order)


def test_target_counts_on_unbalanced_data():
    spec = parse_imbalance("longtail:4", 3)  # profile 1, 1/2, 1/4
    assert target_counts(spec, [100, 100, 100]) == [100, 50, 25]
    assert target_counts(spec, [100, 30, 100]) == [60, 30, 15]  # class 1 limits the reference size
    assert target_counts(spec, [100, 0, 100]) == [100, 0, 25]  # an empty class stays empty
    assert target_counts(parse_imbalance("longtail:1000", 3), [10, 10, 10]) == [10, 1, 1]  # at least 1


# ------------------------------------------------------------------------------------------------ memorisation


def test_memorisation_fractions():
    clean = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    noisy = np.array([1, 2, 3, 0, 0, 1, 2, 3])  # first four corrupted
    pred = np.array([1, 1, 0, 0, 0, 1, 0, 0])  # memorised, corrected, other, memorised; clean: 2 of 4 right
    result = memorisation(pred, clean, noisy)
    assert result["num_noisy"] == 4 and result["num_clean"] == 4
    assert result["memorised"] == 0.5 and result["corrected"] == 0.25 and result["other"] == 0.25
    assert result["clean_accuracy"] == 0.5
    none = memorisation(np.array([0, 1]), np.array([0, 0]), np.array([0, 0]))
    assert none["memorised"] is None and none["corrected"] is None and none["other"] is None
    assert none["clean_accuracy"] == 0.5 and none["num_noisy"] == 0
    assert memorisation(np.array([1]), np.array([0]), np.array([1]))["clean_accuracy"] is None


# ------------------------------------------------------------------------------------------------ bad specs


@pytest.mark.parametrize(
    "text",
    [
        "symmetric:1.5",
        "symmetric:-0.1",
        "pairflip:2",
        "symmetric:abc",
        "symmetric:",
        "symmetric:nan",
        "symmetric:0.1:0.2",
        "gaussian:0.1",
        "asymmetric:0.2",  # C = 5: needs a mapping
        "matrix:/no/such/file.json",
        "matrix:",
    ],
)
def test_bad_noise_specs(text):
    with pytest.raises(KdcliError) as info:
        parse_noise(text, 5)
    assert text in str(info.value)


def test_asymmetric_for_other_class_counts_asks_for_a_mapping():
    with pytest.raises(KdcliError, match="mapping"):
        parse_noise("asymmetric:0.2", 100)


@pytest.mark.parametrize(
    "content",
    [
        [[1.0, 0.0], [0.0, 1.0]],  # wrong shape for 3 classes
        [[0.5, 0.5, 0.1], [0, 1, 0], [0, 0, 1]],  # row 0 sums to 1.1
        [[1.5, -0.5, 0], [0, 1, 0], [0, 0, 1]],  # negative entry
        [["a", 0, 0], [0, 1, 0], [0, 0, 1]],
        {"0": 1},
    ],
)
def test_bad_matrix_files(tmp_path, content):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(content))
    with pytest.raises(KdcliError) as info:
        parse_noise(f"matrix:{path}", 3)
    assert f"matrix:{path}" in str(info.value)


def test_bad_class_map_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"0": 7}))
    with pytest.raises(KdcliError, match="outside"):
        parse_noise(f"asymmetric:0.2:{path}", 3)


@pytest.mark.parametrize(
    "text",
    [
        "longtail:0.5",
        "longtail:abc",
        "longtail",
        "longtail:10:2",
        "step:10:0",
        "step:10:1",
        "step:0.5:0.5",
        "step:10",
        "zipf:2",
    ],
)
def test_bad_imbalance_specs(text):
    with pytest.raises(KdcliError) as info:
        parse_imbalance(text, C)
    assert text in str(info.value)


@pytest.mark.parametrize("order", ["1,2,3", "0,0,1,2,3,4,5,6,7,8", "random:x", "a,b", [0, 1]])
def test_bad_class_orders(order):
    with pytest.raises(KdcliError, match="class order"):
        parse_imbalance("longtail:10", C, order)


def test_labels_outside_the_classes():
    with pytest.raises(KdcliError, match="label 12"):
        noisy_labels(parse_noise("symmetric:0.1", C), np.array([1, 12]), np.array([0, 1]), C)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_the_built_in_asymmetric_map_is_for_cifar10_classes_only(tmp_path):
    """The map is by class index: on another 10-class set (digits, MNIST, STL-10) it would flip meaningless
    pairs, so it needs CIFAR-10's names in CIFAR-10's order; a map file works for any classes."""
    spec = parse_noise("asymmetric:0.4", C, CIFAR10_NAMES)
    assert spec.matrix[9, 1] == pytest.approx(0.4) and spec.matrix[3, 5] == pytest.approx(0.4)
    assert parse_noise("asymmetric:0.4", C, ["plane", "car", *CIFAR10_NAMES[2:]]).matrix[2, 0] == pytest.approx(0.4)
    for names in ([str(i) for i in range(10)], CIFAR10_NAMES[::-1]):
        with pytest.raises(KdcliError, match="the built-in asymmetric map is CIFAR-10's.*asymmetric:R:FILE"):
            parse_noise("asymmetric:0.4", C, names)
    path = tmp_path / "map.json"
    path.write_text('{"7": 1}')
    assert parse_noise(f"asymmetric:0.3:{path}", C, [str(i) for i in range(10)]).matrix[7, 1] == pytest.approx(0.3)


def test_a_noise_file_that_is_not_text_is_one_line(tmp_path):
    path = tmp_path / "T.npy"
    np.save(path, np.eye(3))
    with pytest.raises(KdcliError, match="is not a text file"):
        parse_noise(f"matrix:{path}", 3)
    with pytest.raises(KdcliError, match="is not a text file"):
        parse_noise(f"asymmetric:0.2:{path}", 3)


def test_a_class_order_needs_an_imbalance(capsys, tmp_path):
    from kdcli.data.corruption import check_class_order
    from tests.test_cli import fails

    check_class_order(None, None)
    check_class_order("1,0", "longtail:10")
    with pytest.raises(KdcliError, match="--class-order orders the classes of the --imbalance profile"):
        check_class_order("1,0", None)
    order = ",".join(str(i) for i in reversed(range(10)))
    for extra in ([], ["--noise", "symmetric:0.2"]):  # alone, or beside noise: it would change nothing
        err = fails(capsys, "train", "--model", "cifar_resnet8", "--dataset", "digits", "--class-order", order,
                    *extra, "--out", tmp_path / "o")
        assert "give --imbalance too" in err
    assert not (tmp_path / "o").exists()
