"""Quickstart: build an attention Seq2Seq model, train it a few steps to reverse sequences, and translate with beam
search. Runs in seconds on a CPU; the same code as the README's quickstart.

    python examples/quickstart.py
"""

import torch
from transformers import AutoModelForSeq2SeqLM

from rnn_seq2seq_hf import RNNSeq2SeqConfig  # importing the library registers its models with the Auto classes

torch.manual_seed(0)
config = RNNSeq2SeqConfig(
    vocab_size=20,
    embedding_size=32,
    hidden_size=64,
    cell_type="lstm",
    attention_type="general",
    embedding_dropout=0.0,
    hidden_dropout=0.0,
    output_dropout=0.0,
)  # pad=0, bos=1, eos=2
model = AutoModelForSeq2SeqLM.from_config(config)

# Toy task: reverse a sequence of tokens 3..19, then EOS.
source = torch.randint(3, 20, (512, 6))
labels = torch.cat([source.flip(1), torch.full((512, 1), config.eos_token_id)], dim=1)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
model.train()
for step in range(150):
    batch = slice((step * 32) % 512, (step * 32) % 512 + 32)
    loss = model(input_ids=source[batch], labels=labels[batch]).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"loss after 150 steps: {loss.item():.3f}")

model.eval()
test = torch.tensor([[5, 9, 4, 17, 12, 8]])
translation = model.generate(input_ids=test, num_beams=5, max_new_tokens=10)
print("source:", test[0].tolist(), "-> output:", translation[0, 1:].tolist())
