"""Training-loop integrations: HuggingFace Trainer and Lightning step the Scheduler, add the gate loss,
log the stage, bits and gate mix, and save/restore the Scheduler with their checkpoints."""
import json

import pytest
import torch
import torch.nn.functional as F

import fracpass
from fracpass.errors import FracpassError
from fracpass.integrations._common import load_scheduler_state, log_entries, save_scheduler_state, state_file


def _mlp_scheduler(switch=fracpass.AtSteps((2,))):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    plan = fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8), switch=switch)
    qmodel = fracpass.transform(model, plan, example_inputs=(torch.randn(2, 4),))
    return fracpass.Scheduler(qmodel)


def test_scheduler_state_file_round_trips_and_names_a_wrong_checkpoint(tmp_path):
    sched = _mlp_scheduler()
    for _ in range(3):
        sched.step(torch.tensor(1.0))
    path = state_file(tmp_path / "checkpoint-3")
    save_scheduler_state(sched, path, step=3)
    assert json.loads(path.read_text())["step"] == 3
    other = _mlp_scheduler()
    load_scheduler_state(other, path, step=3)
    assert (other.stage, other.iteration, other.history) == (1, 3, [(2, 0, 1, "reached step 2")])
    assert fracpass.current_stage(other.qmodel) == 1
    with pytest.raises(FracpassError, match=r"resuming at step 4, but .* holds the Scheduler's state at step 3"):
        load_scheduler_state(other, path, step=4)
    with pytest.raises(FracpassError, match=r"checkpoint-9.* does not exist, so the fracpass Scheduler's stage"):
        load_scheduler_state(other, state_file(tmp_path / "checkpoint-9"), step=9)
    assert state_file(tmp_path, rank=1, world_size=2).name == "fracpass_scheduler_rank1.json"


def test_log_entries_name_stage_bits_and_gate_mix():
    sched = _mlp_scheduler()
    assert log_entries(sched) == {"fracpass/stage": 0, "fracpass/w_bits": 4, "fracpass/a_bits": 4, "fracpass/g_bits": 8,
                                  "fracpass/switches": 0}


# -- HuggingFace Trainer --------------------------------------------------------------------------------
def _bert(plan, labels=True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    ids = torch.randint(0, 100, (4, 8))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if labels:  # the model computes its own loss, as HF models do when given labels
        kwargs["labels"] = torch.randint(0, 3, (4,))
    return fracpass.transform(transformers.BertForSequenceClassification(cfg), plan, example_kwargs=kwargs)


class Tokens(torch.utils.data.Dataset):
    """Synthetic token ids with a class label."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(input_ids=torch.randint(0, 100, (8,), generator=g), attention_mask=torch.ones(8, dtype=torch.long),
                    labels=torch.tensor(i % 3))


def _args(out, steps, **kwargs):
    pytest.importorskip("accelerate")  # the Trainer needs it
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_steps=2,
                             logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **kwargs)


def _gated_plan():
    plan = fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8), switch=fracpass.AtSteps((3,)))
    return plan.with_gates(fracpass.Gates(a=(4, 8), g=(8, 8), w=8, granularity="block", target=3.0))


@pytest.mark.slow  # three Trainer runs, ~60 s on 2 cores
def test_trainer_switches_logs_checkpoints_and_resumes_exactly(tmp_path):
    from fracpass.integrations.transformers import FracpassTrainer

    def run(out, steps, resume=None):
        qmodel = _bert(_gated_plan())
        sched = fracpass.Scheduler(qmodel)
        trainer = FracpassTrainer(model=qmodel, args=_args(out, steps), train_dataset=Tokens(), scheduler=sched)
        trainer.train(resume_from_checkpoint=resume)
        return sched, [h for h in trainer.state.log_history if "loss" in h]

    sched, logs = run(tmp_path / "run", 5)
    assert sched.history == [(3, 0, 1, "reached step 3")] and sched.stage == 1 and sched.iteration == 5
    assert [h["fracpass/stage"] for h in logs] == [0, 0, 1, 1, 1]  # the stage after each step's Scheduler.step
    assert [h["fracpass/a_bits"] for h in logs] == [4, 4, 8, 8, 8]
    for h in logs:  # the gates' mix over the two options sums to 1, their cost and target are logged
        assert h["fracpass/gate_mix/a4_g8"] + h["fracpass/gate_mix/a8_g8"] == pytest.approx(1.0)
        assert h["fracpass/gate_target"] == 3.0 and h["fracpass/gate_cost"] > 0
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "fracpass_scheduler.json").read_text())
    assert saved["step"] == 2 and saved["scheduler"]["stage"] == 0 and saved["scheduler"]["iteration"] == 2

    # resume before the switch, in another output folder: the switch happens at the same step, the losses
    # are those of the uninterrupted run bit for bit (the Trainer restores torch's RNG, fracpass the Scheduler)
    resumed, resumed_logs = run(tmp_path / "other", 5, resume=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.history == sched.history and resumed.iteration == 5
    assert [h["step"] for h in resumed_logs] == [1, 2, 3, 4, 5]  # steps 1-2 come from the checkpoint's history
    assert [h["loss"] for h in resumed_logs] == [h["loss"] for h in logs]

    # resume after the switch (the last checkpoint of the output folder): stage 1 and its history come back
    late, late_logs = run(tmp_path / "run", 6, resume=True)
    assert late.history == [(3, 0, 1, "reached step 3")] and (late.stage, late.iteration) == (1, 6)
    assert [(h["step"], h["fracpass/stage"]) for h in late_logs] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]


def test_plain_trainer_with_the_callbacks_loss_function_and_gradient_accumulation(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from fracpass.integrations.transformers import FracpassCallback

    plan = fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8), switch=fracpass.AtSteps((2,)))
    qmodel = _bert(plan, labels=False)
    sched = fracpass.Scheduler(qmodel)
    seen = []
    step = sched.step
    sched.step = lambda loss: (seen.append(float(loss)), step(loss))[1]

    def cross_entropy(outputs, labels, num_items_in_batch=None):  # normalized over the accumulated batch
        return F.cross_entropy(outputs["logits"], labels, reduction="sum") / num_items_in_batch

    cb = FracpassCallback(sched)
    trainer = Trainer(model=qmodel, args=_args(tmp_path, 3, gradient_accumulation_steps=2, label_names=["labels"]), train_dataset=Tokens(),
                      callbacks=[cb], compute_loss_func=cb.compute_loss_func(cross_entropy))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert sched.history == [(2, 0, 1, "reached step 2")]
    assert [h["fracpass/stage"] for h in logs] == [0, 1, 1]
    assert seen == pytest.approx([h["loss"] for h in logs], rel=1e-6)  # the Scheduler sees the step's loss
    assert (tmp_path / "checkpoint-2" / "fracpass_scheduler.json").is_file()


@pytest.mark.parametrize("switch", [fracpass.AtSteps((2,)), fracpass.AtEpochs(epochs=(1,), steps_per_epoch=2)],
                         ids=["AtSteps", "AtEpochs"])
def test_callback_alone_steps_a_schedule_that_needs_no_loss(tmp_path, switch):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from fracpass.integrations.transformers import FracpassCallback

    qmodel = _bert(fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8), switch=switch))
    sched = fracpass.Scheduler(qmodel)
    trainer = Trainer(model=qmodel, args=_args(tmp_path, 3), train_dataset=Tokens(), callbacks=[FracpassCallback(sched)])
    trainer.train()
    assert sched.history == [(2, 0, 1, "reached step 2")] and sched.iteration == 3
    assert fracpass.current_stage(qmodel) == 1
    assert [h["fracpass/stage"] for h in trainer.state.log_history if "loss" in h] == [0, 1, 1]
    assert json.loads((tmp_path / "checkpoint-2" / "fracpass_scheduler.json").read_text())["scheduler"]["stage"] == 1


@pytest.mark.parametrize("plan,why", [
    (fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8), switch=fracpass.LossPlateau(window=2)), "LossPlateau switch rule"),
    (_gated_plan(), "gates need their cost loss"),
], ids=["LossPlateau", "gates"])
def test_callback_without_a_loss_says_why_it_needs_one_and_how_to_give_it(tmp_path, plan, why):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from fracpass.integrations.transformers import FracpassCallback

    qmodel = _bert(plan)
    cb = FracpassCallback(fracpass.Scheduler(qmodel))
    trainer = Trainer(model=qmodel, args=_args(tmp_path, 1), train_dataset=Tokens(), callbacks=[cb])
    with pytest.raises(FracpassError, match=f"gave this step's loss to nobody, but .*{why}.*FracpassTrainer.*compute_loss_func"):
        trainer.train()
    with pytest.raises(FracpassError, match="loss_func must be callable"):
        cb.compute_loss_func(None)


# -- Lightning ------------------------------------------------------------------------------------------
def _lightning_example():
    pytest.importorskip("lightning")
    from conftest import ROOT
    import importlib.util

    spec = importlib.util.spec_from_file_location("lightning_train", ROOT / "examples" / "lightning_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three Lightning fits of a gated ResNet-20, ~35 s of CPU
def test_lightning_callback_switches_logs_checkpoints_and_resumes(tmp_path):
    import csv

    example = _lightning_example()
    out = tmp_path / "run"
    sched, trainer = example.run(steps=4, switch_at=3, out=str(out), batch_size=8)
    assert sched.history == [(3, 0, 1, "reached step 3")] and (sched.stage, sched.iteration) == (1, 4)
    rows = list(csv.DictReader(open(out / "logs" / "version_0" / "metrics.csv")))
    assert [float(r["fracpass/stage"]) for r in rows] == [0, 0, 1, 1]
    assert [float(r["fracpass/a_bits"]) for r in rows] == [4, 4, 8, 8]
    mix = [sum(float(r[f"fracpass/gate_mix/a{a}_g8"]) for a in (4, 6, 8)) for r in rows]
    assert mix == pytest.approx([1.0] * 4)
    saved = torch.load(out / "epoch=0-step=2.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("FracpassCallback")]
    assert state["scheduler"]["stage"] == 0 and state["scheduler"]["iteration"] == 2

    # resume before the switch: a fresh model and Scheduler pick up at step 2 and switch at step 3 again
    resumed, _ = example.run(steps=4, switch_at=3, out=str(tmp_path / "again"), resume=str(out / "epoch=0-step=2.ckpt"),
                             batch_size=8)
    assert resumed.history == sched.history and (resumed.stage, resumed.iteration) == (1, 4)
    # resume after it: stage 1 and the history come back from the checkpoint
    late, _ = example.run(steps=5, switch_at=3, out=str(tmp_path / "late"), resume=str(out / "last.ckpt"), batch_size=8)
    assert late.history == sched.history and (late.stage, late.iteration) == (1, 5)
    assert fracpass.current_stage(late.qmodel) == 1


def test_lightning_callback_names_a_missing_loss_key():
    pytest.importorskip("lightning")
    from fracpass.integrations.lightning import FracpassCallback

    cb = FracpassCallback(_mlp_scheduler(), loss_key="task_loss")
    with pytest.raises(FracpassError, match=r"returned \['loss'\] but no 'task_loss'.*loss_key="):
        cb.on_train_batch_end(None, None, {"loss": torch.tensor(1.0)}, None, 0)


@pytest.mark.slow  # two Trainer runs of the example (~30 s)
def test_hf_trainer_example_runs_and_resumes(tmp_path):
    pytest.importorskip("accelerate")
    import subprocess
    import sys

    from conftest import ROOT

    script = str(ROOT / "examples" / "hf_trainer.py")
    first = subprocess.run([sys.executable, script, "--steps", "4", "--switch-at", "3", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 3: stage 0 -> 1 (reached step 3)" in first.stdout
    again = subprocess.run([sys.executable, script, "--steps", "6", "--switch-at", "3", "--out", str(tmp_path), "--resume"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "iteration 6, switches 1" in again.stdout and "step 3: stage 0 -> 1" in again.stdout
