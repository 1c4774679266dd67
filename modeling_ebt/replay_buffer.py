"""The System 2 replay buffer (the reference's `mcmc_replay_buffer`): final logits of earlier batches, from which part
of each training batch restarts its descent. It belongs to training, not to the model: `EBTTrainer` extends each
batch with sampled sequences and their logits as `initial_logits`, and records the batch's final logits after the
step; the model only sees a batch and its starting logits."""

import torch

from .modeling_ebt import default_positions


class ReplayBuffer:
    """Sequences with their final logits, of one length: a batch of another length replaces what it held."""

    FIELDS = ("input_ids", "labels", "logits")

    def __init__(self, size: int, sample_fraction: float = 0.5):
        self.size, self.sample_fraction, self.records = size, sample_fraction, []

    @classmethod
    def for_config(cls, config) -> "ReplayBuffer | None":
        if not config.mcmc_replay_buffer:
            return None
        return cls(config.mcmc_replay_buffer_size, config.mcmc_replay_buffer_sample_fraction)

    def add(self, input_ids, labels, logits):
        if self.records and self.records[0][0].shape != input_ids.shape[1:]:
            self.records = []
        for row in zip(input_ids.cpu(), labels.cpu(), logits.detach().cpu()):
            self.records.append(row)
        del self.records[: max(len(self.records) - self.size, 0)]

    def sample(self, count: int, device):
        picks = torch.randperm(len(self.records))[:count].tolist()
        return [torch.stack([self.records[i][j] for i in picks]).to(device) for j in range(3)]

    def extend(self, inputs: dict, model) -> dict:
        """`inputs` (a training batch for `model`) with `sample_fraction` of its size in replayed sequences
        appended, and `initial_logits`: the model's fresh starting noise for the batch, the recorded final logits
        for the replayed rows. Unchanged while the buffer is empty or holds another sequence length."""
        ids = inputs["input_ids"]
        count = min(round(ids.shape[0] * self.sample_fraction), len(self.records))
        if count == 0 or self.records[0][0].shape != ids.shape[1:]:
            return inputs
        replay_ids, replay_labels, replay_logits = self.sample(count, ids.device)
        start = inputs.get("initial_logits")
        if start is None:
            start = model.initial_logits(default_positions(ids, 0))
        extended = dict(inputs, input_ids=torch.cat((ids, replay_ids)), labels=torch.cat((inputs["labels"],
                        replay_labels)), initial_logits=torch.cat((start, replay_logits.to(start.dtype))))
        if inputs.get("attention_mask") is not None:
            extended["attention_mask"] = torch.cat((inputs["attention_mask"], torch.ones_like(replay_ids)))
        if inputs.get("position_ids") is not None:
            extended["position_ids"] = torch.cat((inputs["position_ids"], default_positions(replay_ids, 0)))
        return extended

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The records as three stacked tensors (empty when the buffer is), e.g. for safetensors."""
        if not self.records:
            return {}
        return {name: torch.stack([record[j] for record in self.records]) for j, name in enumerate(self.FIELDS)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.records = list(zip(*(state[name].unbind(0) for name in self.FIELDS))) if state else []
