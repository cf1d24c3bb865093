"""mergekit's methods (task arithmetic, TIES, DARE, SLERP): each written soup equals a plain-torch implementation in
this file; DARE's masks keep `density` of the entries, rescale them exactly and are seeded; per-model options follow
the order of --candidates; mergekit YAML configs give the same soups as the flags, and unsupported ones are
refused before anything is written."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import run_main, tiny_config
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, BertModel

from hf_soup import cook
from hf_soup.errors import ConfigError
from hf_soup.merge.methods import dare_generator, random_mask
from hf_soup.mergekit_yaml import mergekit_options
from hf_soup.pipeline.reproduce import reproduce


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer_dir):
    """A headless base and three fine-tunes (a shared direction plus their own noise), and a fourth that is the
    first one's task vector times 1.5 (parallel to it in every tensor: SLERP's linear fallback)."""
    root = tmp_path_factory.mktemp("methods")
    config = tiny_config()
    torch.manual_seed(0)
    base = BertModel(config, add_pooling_layer=True)
    base.save_pretrained(root / "base")
    shutil.copytree(tokenizer_dir, root / "base", dirs_exist_ok=True)
    torch.manual_seed(1)
    start = BertForSequenceClassification(config)
    start.bert.load_state_dict(base.state_dict())
    shared = torch.Generator().manual_seed(100)
    direction = {k: torch.randn(v.shape, generator=shared) for k, v in start.state_dict().items()}
    for seed, name in enumerate("abc", start=10):
        noise = torch.Generator().manual_seed(seed)
        state = {
            k: v + 0.01 * (direction[k] + torch.randn(v.shape, generator=noise))
            if v.is_floating_point()
            else v
            for k, v in start.state_dict().items()
        }
        model = BertForSequenceClassification(config)
        model.load_state_dict(state)
        model.save_pretrained(root / "runs" / name)
    a = load_file(str(root / "runs" / "a" / "model.safetensors"))
    model = BertForSequenceClassification(config)
    model.load_state_dict({k: 1.5 * v if v.is_floating_point() else v for k, v in a.items()}, strict=False)
    model.save_pretrained(root / "scaled")
    return root


def tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def soup(family, tmp_path, recipe: str, *flags: str, runs="abc", name="soup"):
    out = tmp_path / name
    candidates = [str(family / "runs" / r) for r in runs]
    args = ["--base", str(family / "base"), "--candidates", *candidates, "--recipe", recipe, *flags]
    result = run_main(*args, "--output", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def reference(family, runs, weights, combine, lam=1.0, normalize=False, density=None, masks=None):
    """θ_0 + λ·Σ m_i δ_i / (Σ m_i w_i or 1) in float64 from float32 task vectors, with δ_i = w_i·sparsified τ_i:
    `combine` is "linear" or "elect" (TIES' sign election: the sign of Σ δ_i, zeros never agree). Tensors the base
    lacks are the weights' normalised average."""
    base = tensors(family / "base")
    models = [tensors(family / "runs" / r) for r in runs]
    out = {}
    for name in models[0]:
        values = [m[name] for m in models]
        base_name = name.removeprefix("bert.")
        if base_name not in base:
            out[name] = sum(w * v.double() for w, v in zip(weights, values, strict=True)) / sum(weights)
            continue
        theta0 = base[base_name]
        deltas = []
        for index, (weight, value) in enumerate(zip(weights, values, strict=True)):
            tau = value.float() - theta0.float()
            if density is not None and masks is None:  # TIES: the top density by magnitude
                k = max(1, int(density[index] * tau.numel()))
                threshold = tau.abs().reshape(-1).sort(descending=True).values[k - 1]
                tau = torch.where(tau.abs() >= threshold, tau, 0)
            if masks is not None:  # DARE: the product's masks, rescaled here
                tau = tau * masks(name, index, tau) / density[index]
            deltas.append(weight * tau.double())
        if combine == "elect":
            sign = torch.where(sum(deltas) >= 0, 1.0, -1.0).double()
            agree = [torch.sign(d) == sign for d in deltas]
            merged = sum(d * a for d, a in zip(deltas, agree, strict=True))
            divisor = sum(w * a.double() for w, a in zip(weights, agree, strict=True))
            divisor = torch.where(divisor == 0, 1.0, divisor)
        else:
            merged, divisor = sum(deltas), (sum(weights) or 1.0)
        out[name] = theta0.double() + lam * (merged / divisor if normalize else merged)
    return out


def assert_matches(written, expected, atol=1e-6):
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=0, atol=atol, msg=name)


def test_task_arithmetic_matches_plain_torch(family, tmp_path):
    out = soup(family, tmp_path, "task_arithmetic", "--weights", "0.5,0.3,0.2", "--lambda", "0.8")
    expected = reference(family, "abc", [0.5, 0.3, 0.2], "linear", lam=0.8)
    assert_matches(tensors(out), expected)
    manifest = json.loads((out / "soup.json").read_text())
    assert manifest["mixture"]["method"]["name"] == "task_arithmetic"
    assert manifest["recipe"]["reference_url"] == "https://arxiv.org/abs/2212.04089"
    card = (out / "README.md").read_text()
    assert "### Task arithmetic" in card and "`--lambda 0.8`" in card and "`--weights 0.5,0.3,0.2`" in card


def test_task_arithmetic_normalized_is_the_weighted_average(family, tmp_path):
    out = soup(family, tmp_path, "task_arithmetic", "--weights", "2,1,1", "--normalize")
    models = [tensors(family / "runs" / r) for r in "abc"]
    average = {
        k: (2 * models[0][k].double() + models[1][k].double() + models[2][k].double()) / 4 for k in models[0]
    }
    assert_matches(tensors(out), average)


def test_ties_matches_plain_torch(family, tmp_path):
    out = soup(family, tmp_path, "ties", "--weights", "0.5,0.3,1.0", "--density", "0.5,0.3,0.7")
    expected = reference(family, "abc", [0.5, 0.3, 1.0], "elect", normalize=True, density=[0.5, 0.3, 0.7])
    assert_matches(tensors(out), expected)
    card = (out / "README.md").read_text()
    assert "[Yadav et al. 2023, *TIES-Merging*](https://arxiv.org/abs/2306.01708)" in card
    assert "density = 0.3" in card and "normalize = on" in card


def test_ties_trims_and_elects_signs(family, tmp_path):
    """Built so the answer is known: at density 1 and equal weights, every entry where the three task vectors
    agree in sign is their mean, and an entry the sign election splits is the mean of the majority-mass side."""
    out = soup(family, tmp_path, "ties", "--no-normalize", "--lambda", "1")
    written, base = tensors(out), tensors(family / "base")
    models = [tensors(family / "runs" / r) for r in "abc"]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    taus = torch.stack([m[name].float() - base[name.removeprefix("bert.")].float() for m in models])
    agree = (taus > 0).all(0) | (taus < 0).all(0)
    delta = written[name].double() - base[name.removeprefix("bert.")].double()
    torch.testing.assert_close(delta[agree], taus.double().sum(0)[agree], rtol=0, atol=1e-6)
    elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    kept = (torch.sign(taus) == elected).double()
    torch.testing.assert_close(delta[~agree], (taus.double() * kept).sum(0)[~agree], rtol=0, atol=1e-6)


def test_dare_masks_keep_density_and_are_seeded():
    """The kept fraction is `density` within its 99.9% binomial interval, masks differ by seed, tensor and
    ingredient, and the same key gives the same mask."""
    shape, density = (400, 500), 0.3
    mask = random_mask(torch.ones(shape), density, dare_generator(0, "w", 0))
    half = 3.29 * math.sqrt(density * (1 - density) / mask.numel())
    assert abs(float(mask.float().mean()) - density) <= half
    assert torch.equal(mask, random_mask(torch.ones(shape), density, dare_generator(0, "w", 0)))
    for other in (dare_generator(1, "w", 0), dare_generator(0, "v", 0), dare_generator(0, "w", 1)):
        assert not torch.equal(mask, random_mask(torch.ones(shape), density, other))


@pytest.mark.parametrize(
    "recipe, combine, normalize", [("dare_linear", "linear", False), ("dare_ties", "elect", False)]
)
def test_dare_matches_plain_torch_on_its_masks(family, tmp_path, recipe, combine, normalize):
    """Given the product's masks (seeded by --seed, tensor and ingredient), the rescaling by 1/density and the
    merge are the plain-torch ones; a rerun with the same seed is identical and another seed differs."""
    weights, density = [0.5, 0.3, 0.2], [0.5, 0.3, 0.7]
    flags = ["--weights", "0.5,0.3,0.2", "--density", "0.5,0.3,0.7", "--seed", "7"]
    out = soup(family, tmp_path, recipe, *flags)

    def masks(name, index, tau):
        return random_mask(tau, density[index], dare_generator(7, name, index))

    expected = reference(family, "abc", weights, combine, normalize=normalize, density=density, masks=masks)
    assert_matches(tensors(out), expected)
    again = soup(family, tmp_path, recipe, *flags, name="again")
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    other = soup(family, tmp_path, recipe, *flags[:-1], "8", name="other")
    assert (out / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert reproduce(str(out), quiet=True).ok
    card = (out / "README.md").read_text()
    assert "https://arxiv.org/abs/2311.03099" in card and "masks seeded by `--seed 7`" in card


def test_dare_mean_over_seeds_converges_to_the_undropped_merge(family, tmp_path):
    """DARE is unbiased: E[mask/density] = 1, so the mean of many seeded soups approaches task arithmetic. Here
    its error against the undropped merge is measured at K = 2 and K = 8 seeds: it falls like 1/√K."""
    flags = ["--weights", "1,0", "--density", "0.5"]
    undropped = tensors(soup(family, tmp_path, "task_arithmetic", "--weights", "1,0", runs="ab", name="ta"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    soups = []
    for seed in range(8):
        out = soup(family, tmp_path, "dare_linear", *flags, "--seed", str(seed), runs="ab", name=f"s{seed}")
        soups.append(tensors(out)[name].double())

    def rms_error(k: int) -> float:
        return float((sum(soups[:k]) / k - undropped[name].double()).pow(2).mean().sqrt())

    assert 0.3 < rms_error(8) / rms_error(2) < 0.75  # 1/√4 = 0.5


def slerp_whole(t, a, b):
    """SLERP of two tensors as single vectors in float64, linear where |cos| > 0.9995; a zero tensor counts as
    orthogonal to everything (mergekit's convention: its norm is taken as 1)."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    norms = [n if n > 1e-8 else 1.0 for n in (float(x.norm()), float(y.norm()))]
    cos = max(-1.0, min(1.0, float(x @ y) / (norms[0] * norms[1])))
    if abs(cos) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    omega = math.acos(cos)
    return ((math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)).reshape(a.shape)


def test_slerp_matches_plain_torch_and_falls_back_to_linear(family, tmp_path):
    out = soup(family, tmp_path, "slerp", "--t", "0.3", runs="ab")
    a, b = tensors(family / "runs" / "a"), tensors(family / "runs" / "b")
    for name, value in tensors(out).items():
        expected = slerp_whole(0.3, a[name], b[name])
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=2e-6, msg=name)
    # A candidate parallel to `a` everywhere (1.5·a): every tensor takes the linear path, (1 − t)·a + t·1.5·a.
    shutil.copytree(family / "scaled", tmp_path / "runs" / "z")
    shutil.copytree(family / "runs" / "a", tmp_path / "runs" / "a")
    pair = [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "z")]
    args = ["--base", str(family / "base"), "--candidates", *pair, "--recipe", "slerp", "--t", "0.4"]
    result = run_main(*args, "--output", str(tmp_path / "parallel"), "--quiet", "--include-flagged")
    assert result.returncode == 0, result.stderr
    for name, value in tensors(tmp_path / "parallel").items():
        if a[name].is_floating_point():
            torch.testing.assert_close(value.double(), 1.2 * a[name].double(), rtol=0, atol=1e-6, msg=name)


def test_slerp_with_one_candidate_starts_at_the_base(family, tmp_path):
    """mergekit's form: from the base (t = 0) to the one candidate; the head the base lacks is the candidate's."""
    out = soup(family, tmp_path, "slerp", "--t", "0.25", runs="a")
    base, a = tensors(family / "base"), tensors(family / "runs" / "a")
    for name, value in tensors(out).items():
        if name.removeprefix("bert.") not in base:
            assert torch.equal(value, a[name])
            continue
        expected = slerp_whole(0.25, base[name.removeprefix("bert.")], a[name])
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=2e-6, msg=name)


def test_per_model_options_follow_the_order_of_candidates(family, tmp_path):
    out = soup(family, tmp_path, "ties", "--weights", "0.5,0.3,0.2", "--density", "0.9", runs="cab")
    mixture = json.loads((out / "soup.json").read_text())["mixture"]
    weights = {i["id"].rsplit("/", 1)[-1]: i["weight"] for i in mixture["ingredients"]}
    assert weights == {"c": 0.5, "a": 0.3, "b": 0.2}
    assert set(mixture["method"]["density"].values()) == {0.9}
    runs = family / "runs"
    pairs = f"{runs / 'a'}=0.3,{runs / 'b'}=0.2,{runs / 'c'}=0.5"  # by id, in another order than --candidates
    by_id = soup(family, tmp_path, "ties", "--weights", pairs, "--density", "0.9", runs="cab", name="by-id")
    assert (out / "model.safetensors").read_bytes() == (by_id / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--recipe", "ties", "--weights", "0.5,0.5"], "gives 2 values but the soup has 3 candidates"),
        (["--recipe", "ties", "--density", "0"], "--density must be in (0, 1]"),
        (["--recipe", "ties", "--weights", "x=1"], "names x, which is not in the soup"),
        (["--recipe", "slerp"], "interpolates 2 models; the soup has 3 candidates"),
        (["--recipe", "slerp", "--t", "1.5"], "--t must be in [0, 1]"),
        (["--recipe", "task_arithmetic", "--t", "0.5"], "--t is an option of --recipe slerp"),
        (["--recipe", "task_arithmetic", "--density", "0.5"], "--density is an option of --recipe ties"),
    ],
)
def test_bad_method_options_are_refused_before_anything_is_written(family, tmp_path, flags, message):
    runs = [str(family / "runs" / r) for r in "abc"]
    result = run_main(
        "--base", str(family / "base"), "--candidates", *runs, *flags, "--output", str(tmp_path / "o")
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def write_config(tmp_path, family, method="ties", extra=""):
    models = "\n".join(
        f"  - model: {family / 'runs' / r}\n    parameters: {{weight: {w}, density: {d}}}"
        for r, w, d in (("a", 0.5, 0.5), ("b", 0.3, 0.3), ("c", 1.0, 0.7))
    )
    path = tmp_path / "merge.yml"
    path.write_text(
        f"merge_method: {method}\nbase_model: {family / 'base'}\nmodels:\n{models}\ndtype: float32\n{extra}"
    )
    return path


def test_a_mergekit_config_gives_the_soup_its_flags_give(family, tmp_path):
    config = write_config(tmp_path, family, extra="parameters: {lambda: 0.9}\n")
    result = run_main("--mergekit-config", str(config), "--output", str(tmp_path / "yaml"), "--quiet")
    assert result.returncode == 0, result.stderr
    flags = ["--weights", "0.5,0.3,1.0", "--density", "0.5,0.3,0.7", "--lambda", "0.9", "--dtype", "float32"]
    by_flags = soup(family, tmp_path, "ties", *flags, name="flags")
    expected = (by_flags / "model.safetensors").read_bytes()
    assert (tmp_path / "yaml" / "model.safetensors").read_bytes() == expected
    options = mergekit_options(config)
    assert options["recipe"] == "ties" and options["lambda_"] == 0.9 and options["dtype"] == "float32"
    direct = cook(**options, output=str(tmp_path / "python"), quiet=True)
    assert direct.output and (tmp_path / "python" / "model.safetensors").read_bytes() == expected


def test_a_linear_config_averages_every_model_listed_as_mergekit_does(family, tmp_path):
    """mergekit's linear merges base_model too when it is listed with a weight (and fails without one): the base is
    then an ingredient, and otherwise only the base of the checks."""
    base, runs = str(family / "base"), [str(family / "runs" / r) for r in "ab"]
    config = tmp_path / "linear.yml"

    def options_of(listed: list[str], extra: str = "") -> dict:
        models = "".join(f"  - model: {m}\n    parameters: {{weight: 2.0}}\n" for m in listed)
        config.write_text(f"merge_method: linear\nbase_model: {base}\nmodels:\n{models}{extra}")
        return mergekit_options(config)

    # Without the base among the models: the mean of the others (their uniform soup).
    assert options_of(runs) == {"base": base, "recipe": "uniform", "candidates": runs}
    # With it: (θ_base + θ_a + θ_b) / 3 = θ_base + (τ_a + τ_b) / 3, task arithmetic at λ = 1, weights 1/3.
    with_base = options_of([base, *runs])
    assert with_base["recipe"] == "task_arithmetic" and with_base["candidates"] == runs
    assert with_base["weights"] == ",".join(f"{r}={1 / 3!r}" for r in runs) and "lambda_" not in with_base
    with pytest.raises(ConfigError, match="normalize: false"):  # a sum, which no hf-soup recipe writes
        options_of(runs, "parameters: {normalize: false}\n")


@pytest.mark.parametrize(
    "method, extra, named",
    [
        ("ties", "slices:\n  - sources: []\n", "`slices`"),
        ("ties", "parameters: {lambda: [0.1, 0.9]}\n", "a gradient list for lambda"),
        ("ties", "parameters: {lambda: {filter: self_attn, value: 0.5}}\n", "a `filter` for lambda"),
        ("della", "", "merge_method 'della'"),
        ("ties", "parameters: {int8_mask: true}\n", "the ties parameter 'int8_mask'"),
        ("ties", "tokenizer_source: model:foo\n", "tokenizer_source 'model:foo'"),
    ],
)
def test_an_unsupported_mergekit_config_is_refused_by_name(family, tmp_path, method, extra, named):
    config = write_config(tmp_path, family, method, extra)
    with pytest.raises(ConfigError, match="not supported"):
        mergekit_options(config)
    result = run_main("--mergekit-config", str(config), "--output", str(tmp_path / "o"))
    assert result.returncode != 0 and named in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_a_mergekit_config_with_a_flag_it_sets_is_refused(family, tmp_path):
    config = write_config(tmp_path, family)
    result = run_main(
        "--mergekit-config", str(config), "--recipe", "uniform", "--output", str(tmp_path / "o")
    )
    assert result.returncode != 0 and "sets --recipe; drop --recipe" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_method_with_data_is_reported_against_the_best_individual(family, reviews, tmp_path):
    result = cook(
        output=str(tmp_path / "soup"),
        base=str(family / "base"),
        candidates=[str(family / "runs" / "*")],
        dataset=str(reviews["train"]),
        report_split=str(reviews["test"]),
        text_column="review",
        label_column="score",
        recipe="ties",
        density="0.5",
        max_eval_examples=64,
        quiet=True,
    )
    summary = result.summary
    assert summary.recipe.name == "ties" and result.mixture.method["name"] == "ties"
    best = summary.best_individual
    assert best.name in {str(family / "runs" / r) for r in "abc"}
    assert summary.comparisons["test.csv"]["soup"]["accuracy"].delta == pytest.approx(
        summary.soup.report["test.csv"]["accuracy"] - best.report["test.csv"]["accuracy"]
    )
    # "ties" in soup.json is the tie-breaks' list; the TIES recipe's record is "ties_recipe".
    manifest = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert isinstance(manifest["ties"], list) and manifest["ties_recipe"]["normalize"] is True
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "### TIES-Merging" in card and "statistically significant" in card


def test_batchnorm_statistics_are_averaged_not_merged_by_the_method(tmp_path):
    """Built so the method would break them: each fine-tune lowers every running variance by 60%, so DARE at
    density 0.2 (τ/0.2 = −3·var) or λ = 3 would make the variances negative. They are the weights' normalised
    average instead; the weights are merged by the method."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    base = ResNetForImageClassification(config)
    base.save_pretrained(tmp_path / "base")
    runs = []
    for index in range(2):
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for name, value in state.items():
            if name.endswith("running_var"):
                value.mul_(0.4)
            elif value.is_floating_point():
                value.add_(0.01 * torch.randn(value.shape, generator=torch.Generator().manual_seed(index)))
        model = ResNetForImageClassification(config)
        model.load_state_dict(state)
        model.save_pretrained(tmp_path / f"run{index}")
        runs.append(str(tmp_path / f"run{index}"))
    for recipe, flags in (("dare_ties", ["--density", "0.2"]), ("task_arithmetic", ["--lambda", "3"])):
        out = tmp_path / recipe
        args = ["--base", str(tmp_path / "base"), "--candidates", *runs, "--recipe", recipe, *flags]
        result = run_main(*args, "--weights", "0.3,0.7", "--output", str(out), "--quiet", "--include-flagged")
        assert result.returncode == 0, result.stderr
        written, models = tensors(out), [tensors(tmp_path / f"run{i}") for i in range(2)]
        statistics = [k for k in written if k.endswith(("running_var", "running_mean"))]
        assert statistics
        for name in statistics:
            expected = 0.3 * models[0][name].double() + 0.7 * models[1][name].double()
            torch.testing.assert_close(written[name].double(), expected, rtol=0, atol=1e-6, msg=name)
        weight = "resnet.embedder.embedder.convolution.weight"
        assert not torch.allclose(written[weight], 0.3 * models[0][weight] + 0.7 * models[1][weight])
