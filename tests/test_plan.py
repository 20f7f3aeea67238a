import pytest

import fracpass
from fracpass import Plan, PlanError, Rule, Stage
from fracpass.meta import OpInfo


def kind_matcher(kind, traits=()):
    return OpInfo(kind, "", (), (), (), traits).matches_kind


def test_static_and_progressive_build_the_stages():
    assert Plan.static(w=4, a=8, g=6).stages == (Stage(4, 8, 6),)
    plan = Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8))
    assert [(s.w, s.a, s.g) for s in plan.stages] == [(3, 3, 6), (4, 4, 6), (6, 6, 8), (8, 8, 8)]
    assert plan.num_stages == 4


def test_exclude_becomes_rules_with_reasons():
    plan = Plan.static(exclude=("conv1", "fc"))
    assert [r.match for r in plan.rules] == ["conv1", "fc"]
    assert all(r.exclude and "exclude" in r.reason for r in plan.rules)
    assert Plan.static(exclude="fc").rules[0].match == "fc"


@pytest.mark.parametrize("bits", [0, -1, 33, 64])
def test_bits_out_of_range_names_field_and_value(bits):
    with pytest.raises(PlanError, match=rf"stage\.g = {bits}: bits must be from 1 to 32"):
        Plan.static(w=8, a=8, g=bits)
    with pytest.raises(PlanError, match=rf"rule\.w = {bits}"):
        Rule(match="x", w=bits)
    with pytest.raises(PlanError, match=rf"fw\[1\] = {bits}"):
        Plan.progressive(fw=(4, bits), bw=(8, 8))


def test_non_integer_bits_rejected():
    with pytest.raises(PlanError, match=r"stage\.a = 4\.5: bits must be an integer"):
        Stage(w=4, a=4.5, g=8)
    with pytest.raises(PlanError, match=r"stage\.w = True"):
        Stage(w=True, a=4, g=8)


def test_empty_ladder_and_mismatched_ladders():
    with pytest.raises(PlanError, match=r"the ladder is empty"):
        Plan.progressive(fw=(), bw=())
    with pytest.raises(PlanError, match=r"fw has 3 stages \[3, 4, 6\] but bw has 2 \[6, 8\]"):
        Plan.progressive(fw=(3, 4, 6), bw=(6, 8))
    with pytest.raises(PlanError, match=r"at least one stage"):
        Plan(stages=())


def test_rule_per_stage_bits_must_match_stage_count():
    with pytest.raises(PlanError, match=r"rules\[0\]\.g = \[8, 16\]: has 2 entries but the plan has 4 stages"):
        Plan.progressive(rules=[Rule(kind="depthwise", g=(8, 16))])


def test_rule_validation_messages():
    with pytest.raises(PlanError, match="an exclude rule cannot also set bits"):
        Rule(match="fc", exclude=True, w=8)
    with pytest.raises(PlanError, match="must not be empty"):
        Rule(match="")
    with pytest.raises(PlanError, match=r"rule\.exclude = 'yes'"):
        Rule(match="fc", exclude="yes")
    with pytest.raises(PlanError, match=r"plan\.rules\[0\] = 'fc': expected fracpass\.Rule"):
        Plan(stages=(Stage(8, 8, 8),), rules=("fc",))
    with pytest.raises(PlanError, match=r"rule\.g = \[\]"):
        Rule(g=())


def test_resolve_last_match_wins_per_role_and_globs():
    plan = Plan.progressive(rules=[
        Rule(match="layer*", w=6),
        Rule(kind="depthwise", w=8, g=16),
        Rule(match="layer1.0", a=(4, 4, 8, 8)),
    ])
    spec = plan.resolve("layer1.0.conv1", kind_matcher("conv2d", ("grouped", "depthwise")))
    assert spec.w == (8, 8, 8, 8)  # rule 1 overrides rule 0
    assert spec.a == (4, 4, 8, 8)  # "layer1.0" matches its descendants
    assert spec.g == (16, 16, 16, 16)
    assert spec.rules == (0, 1, 2) and not spec.excluded
    other = plan.resolve("head", kind_matcher("linear"))
    assert other.w == (3, 4, 6, 8) and other.rules == ()


def test_resolve_exclusion_carries_reason():
    plan = Plan.static(rules=[Rule(match="fc", exclude=True, reason="classifier stays fp32")])
    spec = plan.resolve("fc", kind_matcher("linear"))
    assert spec.excluded == "classifier stays fp32"
    assert not spec.quantizes("w") and not spec.quantizes("g")
    assert plan.resolve("fc2", kind_matcher("linear")).excluded == ""  # "fc" does not match "fc2"


def test_32_bits_means_not_quantized():
    spec = Plan.static(w=32, a=8, g=32).resolve("x", kind_matcher("linear"))
    assert not spec.quantizes("w") and spec.quantizes("a") and not spec.quantizes("g")


def test_toml_round_trip(tmp_path):
    plan = Plan.progressive(exclude=("conv1",), rules=[
        Rule(kind="depthwise", w=8, g=(8, 8, 16, 16)),
        Rule(match="fc", exclude=True, reason='say "why"'),
    ])
    path = tmp_path / "plan.toml"
    plan.save(path)
    assert Plan.load(path) == plan
    assert "[[stages]]" in path.read_text() and 'reason = "say \\"why\\""' in path.read_text()


def test_example_plan_file_loads():
    from conftest import ROOT

    plan = Plan.load(ROOT / "examples" / "plans" / "fractrain_cifar.toml")
    assert plan == Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8), rules=[
        Rule(match="conv1", exclude=True, reason="stem kept at full precision"),
        Rule(match="fc", exclude=True, reason="classifier kept at full precision"),
    ])


@pytest.mark.parametrize("text, message", [
    ("stages = 3", r"'stages' must be an array of tables"),
    ("format = 1", r"no \[\[stages\]\] tables"),
    ("[[stages]]\nw = 8\na = 8", r"stages\[0\] needs exactly the keys w, a, g \(missing \['g'\]"),
    ("[[stages]]\nw = 8\na = 8\ng = 0", r"stages\[0\]: stage\.g = 0"),
    ("[[stages]]\nw = 8\na = 8\ng = 8\n[[rules]]\nmatch = 'x'\nbits = 4", r"rules\[0\] has unknown key\(s\) \['bits'\]"),
    ("[[stages]]\nw = 8\na = 8\ng = 8\n[gating]\nk = 1", r"unknown section\(s\) \['gating'\]"),
    ("[[stages]]\nw = 8\na = 8\ng = 8\n[gates]\nk = 1", r"\[gates\] has unknown key\(s\) \['k'\]"),
    ("format = 2\n[[stages]]\nw = 8\na = 8\ng = 8", r"format = 2, but this version of fracpass reads format 1"),
    ("[[stages]\nw = 8", r"not valid TOML"),
])
def test_bad_plan_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError, match=r"cannot read plan file .*nope\.toml"):
        Plan.load(tmp_path / "nope.toml")


def test_plan_is_frozen():
    plan = Plan.static()
    with pytest.raises(Exception):
        plan.stages = ()


def test_weight_scale_rules_resolve_round_trip_and_reach_the_quantizers(tmp_path):
    import torch
    from torch import nn

    with pytest.raises(PlanError, match=r"rule\.weight_scale = 'row': use 'channel' .* or 'tensor'"):
        Rule(weight_scale="row")
    with pytest.raises(PlanError, match="an exclude rule cannot also set bits or a weight scale"):
        Rule(match="fc", exclude=True, weight_scale="tensor")
    plan = Plan.static(rules=[Rule(weight_scale="tensor"), Rule(match="head", weight_scale="channel")])
    assert plan.resolve("body", kind_matcher("linear")).weight_scale == "tensor"
    assert plan.resolve("head", kind_matcher("linear")).weight_scale == "channel"  # the last match wins
    assert Plan.static().resolve("body", kind_matcher("linear")).weight_scale == "channel"
    path = tmp_path / "plan.toml"
    plan.save(path)
    assert 'weight_scale = "tensor"' in path.read_text() and Plan.load(path) == plan

    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 8))
    model.add_module("head", nn.Linear(8, 2))
    q = fracpass.transform(model, plan, example_inputs=(torch.randn(4, 8),))
    axes = {name: qz.axis for name, qz in fracpass.quantizers(q) if name.endswith("_wq")}
    assert axes == {"body_wq": None, "head_wq": 0}
