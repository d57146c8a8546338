"""MEMOIR (Wang, Qin, Dimitriadis, Favero & Frossard, NeurIPS 2025, arXiv 2506.07899): lifelong editing with
minimal overwrite and informed retention.

A residual memory, a zero-initialised matrix of the shape of one FFN output projection (LLaMA's ``down_proj``,
GPT-2's ``c_proj``), is added to that projection's output: y = W x + M (x * m), where m is a sparse 0/1 mask
over the projection's input dimensions. Each edit writes only to the columns its own mask selects ("minimal
overwrite"); the mask is TopHash: the top-k input dimensions by |feature|, where the feature is the projection's
input averaged over the prompt tokens minus a background mean (``prompt_feature_agg``), mapped through one fixed
random permutation of the dimensions (the "hash"). The masks of the edits are stored. At inference the input's
own mask is compared with every stored mask; when the best overlap |m_q & m_e| / k reaches ``threshold`` the
memory is applied with that edit's stored mask, otherwise the memory is off and the output is the unedited
model's bit for bit ("informed retention"). The decision is this editor's scope (``query``, ``scope``, a route
with an ``active`` mask), so ``Editor.in_scope`` and the retention pass reuse unedited outputs; generation
with a KV cache keeps the route derived from the prompt for every decoding step.

Follows the authors' code, github.com/qym7/MEMOIR (EasyEdit-based): ``easyeditor/models/memoir/memoir_main.py``
(TopHasher, MEMOIR.edit/_cal_ft_loss, MEMOIRAdapter.new_weight_forward) and ``hparams/MEMOIR/llama3-8b.yaml``
(layer 27 of 32, SGD lr 1.0, 30 iterations, top_k 4096, irr_threshold 0.4, mean_decentered); the training
batch is EasyEdit's WISE ``tokenize`` with ``get_context_templates(length_params=[[5,5],[10,5]])`` (the edit
plus 10 copies behind text the model writes itself) and WISE's ``EarlyStopMeter``. Departures, on purpose:

- Background features. The authors subtract the mean feature of 100 "irrelevant" samples saved by an earlier
  run over the stream (ZsRE's locality prompts with their answers, read through a window set by the edit row's
  positions). Here ``background=model`` averages ``background_samples`` texts the unedited model samples itself
  (seeded), each over all of its tokens, computed once at the first edit and kept in the state; or a local
  ``.txt`` file (one text per line). The stream's own locality probes are never used: they are what locality
  measures.
- The irrelevant row the authors append to every training batch is not run: it carries no loss and rows do
  not interact, so leaving it out changes nothing but time.
- Prompt tokens are found from the attention mask (the authors detect left padding by comparing activations
  with the first token's and read position ids that left padding shifts); padding changes nothing here.
- The loss per row is the authors' sum over target tokens divided by (targets + 1) (their mask also covers the
  last prompt position, whose label is ignored), averaged over rows (``row_loss``: ``authors``; ``mean`` drops
  the +1, ``token`` is the harness's mean over all target tokens).
- Context templates are decoded greedily (WISE's ``generate`` call follows the model's generation config,
  which is greedy for base models); they are made once, at the first edit, and kept in the state.
- Batches of several edits (``batch_size`` > 1; the authors edit one at a time) train one loss over all their
  rows, each edit's rows under its own mask.
- The memory is float32 whatever the model's dtype; the output is cast back. GPT-2's Conv1D is supported (the
  authors' F.linear over the copied weight assumes nn.Linear).
- Ties of the best overlap go to the oldest stored mask (torch.topk's order in the authors' code is
  unspecified); a mask equal to a stored one is not stored twice (as the authors).
Readings that are config keys: ``prompt_feature_agg``, ``top_k``/``top_k_fraction`` (the authors' 4096 of
LLaMA-3-8B's 14336 as a fraction elsewhere), ``overlap`` (the authors' count / k, or Jaccard), ``threshold``,
``background``, ``row_loss``, the early stop (``stop_loss``, ``stop_delta``), ``weight_decay``,
``max_grad_norm``, ``context_template_length_params``.
"""
from baselines.memoir.editor import MEMOIRConfig, MEMOIREditor

__all__ = ["MEMOIRConfig", "MEMOIREditor"]
