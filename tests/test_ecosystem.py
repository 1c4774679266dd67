"""An EBT with the tools a Hugging Face user reaches for: TRL, PEFT, lm-eval, pipelines, streamers, accelerate.

Every test compares the tool's numbers with the model's own computation of the same thing. The models are tiny and
start their descent from zeros with a small initialisation gain: untrained EBTs with large weights amplify float32
round-off through the descent, and these tests compare two computations that run in different batch shapes."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from modeling_ebt import EBTForCausalLM, EBTTokenizer
from tests.conftest import tiny_model

TEXTS = ["to be or not to be", "that is the question", "whether tis nobler in the mind", "to suffer the slings"]


def quiet_model(**overrides) -> EBTForCausalLM:
    """A tiny EBT whose descent is deterministic (zeros start, no noise) and numerically tame."""
    return tiny_model(**{"denoising_initial_condition": "zeros", "initializer_gain": 0.3, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return EBTTokenizer()


def padded_batch(tokenizer, token_lists):
    """Right-padded input_ids and attention_mask, with -100 labels on the padding."""
    width = max(map(len, token_lists))
    ids = torch.full((len(token_lists), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def step_mean_log_likelihood(model, ids, start, end):
    """Σ over tokens start..end-1 of the mean over descent steps of log p(token) (the likelihood the loss uses)."""
    out = model(ids[None], output_step_logits=True)
    log_probs = F.log_softmax(out.step_logits[:, 0, start - 1 : end - 1].float(), dim=-1)  # steps × tokens × vocab
    return log_probs.gather(-1, ids[start:end][None, :, None].expand(len(log_probs), -1, 1)).mean(0).sum()


def final_log_likelihood(model, ids, start):
    """Σ log p(token) of tokens start.. under the final logits (what an evaluation harness scores)."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    log_probs = F.log_softmax(logits[start - 1 : -1].float(), dim=-1)
    return float(log_probs.gather(-1, ids[start:, None]).sum())


def parameters_moved(model, before) -> float:
    return max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if n in before)


# --- TRL ------------------------------------------------------------------------------------------------------------


def sft_trainer(model, tokenizer, tmp_path, packing, max_steps=4, **trainer_kwargs):
    # TRL's configs default to bf16=True; these tests train in float32 (after a bf16 run on CPU, TRL 1.16 leaves
    # torch's CPU autocast enabled in the process)
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=max_steps, per_device_train_batch_size=4,
                     learning_rate=1e-2, logging_steps=1, report_to=[], packing=packing, max_length=48, use_cpu=True,
                     save_strategy="no", disable_tqdm=True, seed=0, bf16=False)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                      processing_class=tokenizer, **trainer_kwargs)


@pytest.mark.parametrize("as_path", [False, True], ids=["object", "path"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_trainer_loss_is_the_ebt_loss_and_training_lowers_it(tmp_path, tokenizer, packing, as_path):
    model = quiet_model().train()
    if as_path:
        model.save_pretrained(tmp_path / "ebt")
        model = str(tmp_path / "ebt")
    trainer = sft_trainer(model, tokenizer, tmp_path, packing)
    model = trainer.model
    # the SFT loss of the whole dataset in one batch (packed: one padding-free row, documents back to back) against
    # the model's own loss on the same documents, one padded row each
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert ("position_ids" in batch and batch["input_ids"].shape[0] == 1) == packing
    documents = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in TEXTS]
    ids, mask, labels = padded_batch(tokenizer, documents)
    own = model(ids, attention_mask=mask, labels=labels).loss
    sft = trainer.compute_loss(model, {k: v for k, v in batch.items()})
    torch.testing.assert_close(sft, own, rtol=1e-5, atol=1e-5)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert parameters_moved(model, before) > 1e-4
    assert float(model(ids, attention_mask=mask, labels=labels).loss.detach()) < float(own.detach())


def test_sft_trainer_with_a_lora_config_starts_at_the_ebt_loss_and_lowers_it(tmp_path, tokenizer):
    from peft import LoraConfig

    model = quiet_model().train()
    documents = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in TEXTS]
    ids, mask, labels = padded_batch(tokenizer, documents)
    with torch.no_grad():
        own = float(model(ids, attention_mask=mask, labels=labels).loss)
    trainer = sft_trainer(model, tokenizer, tmp_path, packing=False,
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(own, rel=1e-5)  # LoRA starts as the identity; the one batch is the dataset
    assert losses[-1] < losses[0]


def test_sft_trainer_refuses_a_loss_that_log_probabilities_cannot_hold(tmp_path, tokenizer):
    trainer = sft_trainer(quiet_model(contrastive_loss_coeff=0.5).train(), tokenizer, tmp_path, packing=False)
    with pytest.raises(ValueError, match="contrastive_loss_coeff"):
        trainer.train()


def test_dpo_trainer_starts_at_ln2_and_prefers_the_chosen_completions(tmp_path, tokenizer):
    """DPO needs the log-probability of a completion in one teacher-forced pass: an EBT's descended logits give it.
    Policy = reference at the start, so the loss is −log σ(0) = ln 2; training raises the chosen completions'
    likelihood relative to the rejected ones, measured with the model's own forward."""
    from trl import DPOConfig, DPOTrainer

    prompts, chosen, rejected = ["to be or", "that is the"], [" not to be", " question"], [" xyzzy", " qqqq"]
    data = Dataset.from_dict({"prompt": prompts * 2, "chosen": chosen * 2, "rejected": rejected * 2})
    model = quiet_model(mcmc_step_size=1.0).train()
    reference = copy.deepcopy(model).eval()
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(math.log(2), abs=2e-3)
    assert losses[-1] < losses[0]

    def margin(network):  # log-likelihood of chosen minus rejected, summed over the pairs
        total = 0.0
        for prompt, good, bad in zip(prompts, chosen, rejected):
            for completion, sign in ((good, 1), (bad, -1)):
                ids = torch.tensor(tokenizer(prompt + completion)["input_ids"])
                with torch.no_grad():
                    total += sign * float(step_mean_log_likelihood(network.eval(), ids, len(prompt), len(ids)))
        return total
    assert margin(trainer.model) > margin(reference) + 1.0


def test_kto_trainer_starts_at_one_half_and_separates_desirable_from_undesirable(tmp_path, tokenizer):
    """KTO at policy = reference: every implicit reward and the KL estimate are 0, so the loss is 1 − σ(0) = 0.5."""
    from trl import KTOConfig, KTOTrainer

    data = Dataset.from_dict({"prompt": ["to be or", "that is the"] * 2, "label": [True, True, False, False],
                              "completion": [" not", " question", " xq", " zz"]})
    model = quiet_model(mcmc_step_size=1.0).train()
    args = KTOConfig(output_dir=str(tmp_path / "kto"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False)
    trainer = KTOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args, train_dataset=data,
                         processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-4) and abs(logs[0]["rewards/margins"]) < 1e-3
    assert logs[-1]["loss"] < logs[0]["loss"] and logs[-1]["rewards/margins"] > 0.1


# --- PEFT -----------------------------------------------------------------------------------------------------------


def test_peft_lora_trains_with_the_trainer_saves_reloads_and_merges_to_the_same_logits(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_state = quiet_model().state_dict()
    lora = get_peft_model(quiet_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    adapter_before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=lora, args=args, train_dataset=data).train()
    assert adapter_before and all("lora_" in name for name in adapter_before)
    assert parameters_moved(lora, adapter_before) > 1e-4
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in lora.named_parameters() if not p.requires_grad}
    assert all(torch.equal(frozen[name], base_state[name]) for name in frozen if name in base_state)

    lora.eval()
    probe = ids[:2, :12]
    with torch.no_grad():
        expected = lora(probe).logits
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(quiet_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        # the same weights; float32 round-off (other kernel paths for the trained tensors), amplified by the descent
        torch.testing.assert_close(reloaded(probe).logits, expected, rtol=1e-4, atol=1e-4)
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, EBTForCausalLM)
        torch.testing.assert_close(merged(probe).logits, expected, rtol=1e-4, atol=1e-4)


# --- lm-eval --------------------------------------------------------------------------------------------------------


def harness(model, tokenizer, batch_size=1):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")


def requests(kind, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


PAIRS = [("to be or", " not"), ("that is", " the question"), ("whether tis nobler", " in"), ("to", " suffer the")]


@pytest.mark.parametrize("saved", [False, True], ids=["object", "folder"])
def test_lm_eval_scores_are_the_models_own_log_likelihoods(tmp_path, tokenizer, saved):
    model = quiet_model()
    pretrained = model
    if saved:
        model.save_pretrained(tmp_path / "ebt")
        tokenizer.save_pretrained(tmp_path / "ebt")
        pretrained = str(tmp_path / "ebt")
    lm = harness(pretrained, tokenizer, batch_size=2)
    scores = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (score, greedy) in zip(PAIRS, scores):
        ids = torch.tensor(tokenizer(context + continuation)["input_ids"])
        assert score == pytest.approx(final_log_likelihood(model, ids, len(context)), rel=1e-5, abs=1e-4)
        with torch.no_grad():
            argmax = model(ids[None]).logits[0, len(context) - 1 : -1].argmax(-1)
        assert greedy == bool((argmax == ids[len(context):]).all())

    text = "to be or not to be"
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    ids = torch.tensor([lm.prefix_token_id] + tokenizer(text)["input_ids"])  # scored after the prefix token
    assert rolling == pytest.approx(final_log_likelihood(model, ids, 1), rel=1e-5, abs=1e-4)

    prompt = "to be"
    (generated,) = lm.generate_until(requests("generate_until", [(prompt, {"until": ["\n\n"], "max_gen_toks": 6,
                                                                             "do_sample": False})]))
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = model.generate(prompt_ids, max_new_tokens=6, do_sample=False)[0, prompt_ids.shape[1]:]
    assert generated == tokenizer.decode(expected).split("\n\n")[0]


def test_lm_eval_multiple_choice_task_from_a_local_file(tmp_path, tokenizer, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [("to be or not to", [" be", " xq"], 0), ("that is the", [" zzz", " question"], 1),
            ("whether tis", [" nobler", " qqqqq"], 0), ("to suffer the", [" slings", " and"], 0)]
    lines = [f'{{"question": "{q}", "choices": ["{a}", "{b}"], "answer": {t}}}' for q, (a, b), t in docs]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "task.yaml").write_text(
        "task: ebt_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    model = quiet_model()
    results = simple_evaluate(model=harness(model, tokenizer, batch_size=4), tasks=["ebt_local_mc"],
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    correct = 0
    for question, choices, target in docs:
        scores = [final_log_likelihood(model, torch.tensor(tokenizer(question + c)["input_ids"]), len(question))
                  for c in choices]
        correct += int(max(range(len(choices)), key=scores.__getitem__) == target)
    assert results["results"]["ebt_local_mc"]["acc,none"] == pytest.approx(correct / len(docs))


def test_lm_eval_log_likelihoods_do_not_depend_on_the_batch_size(tokenizer):
    """Issue 12 item 3: with the configured (random-normal) initial logits, a sequence's evaluation must not depend on
    what else is in the batch. Needs batch-independent initial logits in evaluation (modeling_ebt.py)."""
    model = tiny_model(initializer_gain=0.3)
    scores = {size: [score for score, _ in harness(model, tokenizer, size).loglikelihood(requests("loglikelihood",
                                                                                                 PAIRS))]
              for size in (1, 2, 4)}
    torch.testing.assert_close(torch.tensor(scores[2]), torch.tensor(scores[1]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.tensor(scores[4]), torch.tensor(scores[1]), rtol=1e-5, atol=1e-4)


# --- transformers' pipeline and streamer, accelerate ------------------------------------------------------------------


def test_text_generation_pipeline_passes_the_thinking_arguments(tokenizer):
    from transformers import pipeline

    model = quiet_model()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "to be or"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for thinking in ({"mcmc_num_steps": 1}, {"mcmc_num_steps": 4, "num_candidates": 2}):
        (out,) = generator(prompt, max_new_tokens=6, do_sample=False, **thinking)
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, **thinking)[0]
        assert out["generated_text"] == tokenizer.decode(expected)
    steps_1 = model.generate(ids, max_new_tokens=6, do_sample=False, mcmc_num_steps=1)
    steps_4 = model.generate(ids, max_new_tokens=6, do_sample=False, mcmc_num_steps=4)
    assert not torch.equal(steps_1, steps_4)  # the knob reaches the descent: different steps, different tokens


NON_ASCII = list(range(128, 257))  # bytes that are not whole characters alone, and the end-of-text token


def test_text_iterator_streamer_yields_the_generated_text(tokenizer):
    from transformers import TextIteratorStreamer

    model = quiet_model()
    ids = tokenizer("to be or", return_tensors="pt")["input_ids"]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    options = dict(max_new_tokens=8, do_sample=False, suppress_tokens=NON_ASCII)
    worker = threading.Thread(target=model.generate, args=(ids,), kwargs=dict(options, streamer=streamer))
    worker.start()
    pieces = list(streamer)
    worker.join()
    expected = model.generate(ids, **options)[0, ids.shape[1]:]
    assert "".join(pieces) == tokenizer.decode(expected) and len(pieces) >= 1


def test_accelerator_prepare_loop_trains_like_a_plain_loop():
    from accelerate import Accelerator

    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    loader_args = dict(batch_size=2, shuffle=False)

    def train(model, prepare):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        loader = torch.utils.data.DataLoader(ids, **loader_args)
        backward = torch.Tensor.backward
        if prepare:
            accelerator = Accelerator(cpu=True)
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
            backward = accelerator.backward
        model.train()
        for batch in loader:
            loss = model(batch, labels=batch).loss
            backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        return {n: p.detach() for n, p in model.named_parameters()}

    start = quiet_model().state_dict()
    plain = train(quiet_model(), prepare=False)
    accelerated = train(quiet_model(), prepare=True)
    assert max(float((plain[n] - start[n]).abs().max()) for n in plain) > 1e-3
    for name in plain:
        torch.testing.assert_close(accelerated[name], plain[name], rtol=0, atol=0, msg=name)
