"""WISE (Wang et al., NeurIPS 2024): a side memory beside one FFN matrix, knowledge shards, activation routing.

A copy of one FFN matrix (LLaMA: ``down_proj``; GPT-2: ``c_fc``, as the authors' hparams) is the *side memory*;
the model's own matrix (the *main memory*) is never written. Each edit batch trains the working side memory
with SGD on the edit's loss plus the routing margins, with its gradient masked by a random mask drawn once per
shard of ``save_freq`` edits (``mask_ratio`` of the entries: knowledge sharding). Every ``save_freq`` edits the
shard is put away and a fresh one starts from the main memory; every ``merge_freq`` edits the put-away shards
are merged (TIES by default, ``merge_alg``) relative to the main memory. A router compares side and main
activations: the activation score of an input is the mean over its tokens of
``||act(A(x) W_side) - act(A(x) W_main)||`` (``act`` = the model's FFN activation), and an input whose score
stays under the threshold ``act_ratio * min(in-scope score recorded at the end of each edit)`` uses the main
memory: the unedited output, bit for bit. Training pushes edit inputs' scores over ``beta``, an unrelated
input's under ``alpha`` and their gap over ``gamma`` (the margin losses).

``retrieve=true`` (WISE-Retrieve; the authors' llama-7b.yaml): every shard (and every merged group) stays a
memory of its own with its own threshold; an input takes the memory with the highest score above that
memory's threshold (the working shard first). ``retrieve=false`` (WISE-Merge): one merged side memory plus the
working shard, one threshold, the higher-scoring of the two above it.

Follows EasyEdit ``easyeditor/models/wise/WISE.py`` (WISE, WISEAdapter, euc, merge/gta.py), ``utils.py``
(tokenize, get_context_templates, EarlyStopMeter, EditingMeanAct) and ``hparams/WISE/{llama-7b,gpt2-xl}.yaml``
(zjunlp/EasyEdit @ 14cea82). Departures (docs/editor_wise.md has the list with reasons):

* the route is per sequence and read from its prompt: the score is averaged over each row's real tokens up to
  its key token (``key_position``: ``prompt_last`` by default; ``sequence_last`` = every token as fed, the
  authors' teacher-forced reading); a generation's decoding steps reuse the prompt's route (the authors
  re-route every forward, and their ``.item()`` needs batch size 1). Padding is never averaged (the authors'
  training rows average their pad tokens too); the margins and the recorded activation use the same span;
* WISE-Merge does not fold the working shard into the merged memory as a side effect of inference (the
  authors' ``WISE.__call__``): inference reads the memories that fold would give, without changing the state;
* the unrelated input of the margin loss (the authors' ``loc_prompt``, ZsRE train's NQ questions, not here)
  is the i-th text of ``loc_corpus`` for the i-th edit (default: CounterFact train facts, never an edit or a
  probe of the stream);
* memories of a Conv1D model (GPT-2) are applied as Conv1D (the authors' ``F.linear`` of a retrieved memory
  fails on GPT-2, EasyEdit issue #345);
* the shard masks come from the editor's seeded generator (the authors' global ``np.random``); the context
  prefixes are generated per seed word without padding; the edit loss is each row's mean target-token loss
  (the authors' denominator counts one prompt token and any pad tokens too); several requests per batch get
  one margin loss each, averaged; ``replay`` and the slerp/linear merges are not carried (off in every hparams).
"""
from baselines.wise.editor import WISEConfig, WISEEditor
from baselines.wise.merge import gta_merge

__all__ = ["WISEConfig", "WISEEditor", "gta_merge"]
