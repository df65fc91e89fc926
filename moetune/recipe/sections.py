"""The recipe's sections (`model:`, `router:`, `data:`, `train:`, `eval:`, `merge:`, `export:`) as
typed dataclasses; each field's docstring is its documentation (`moetune explain`). The expert
section lives in `expert_configs` (one class per type), the whole `Recipe`, loading and checks
in `recipe`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from moetune.core.schema import opt

STAGES = ("train", "merge", "eval", "export")
FORMATS = ("auto", "chat", "sharegpt", "instruction", "preference", "prompt_completion", "text")
"""`data.format` choices: 'auto' and the entries of moetune.data.formats.FORMATS (a test keeps them equal)."""


@dataclass
class ModelConfig:
    """The frozen base model (`model:`)."""

    path: str = "smollm2-135m-instruct"
    """Local model directory, a hub id (needs network or a filled HF cache) or the built-in
    name 'smollm2-135m-instruct' (shipped offline; see README)."""
    dtype: str = opt("auto", choices=("auto", "float32", "bfloat16", "float16"))
    """Dtype of the frozen base weights, and the compute dtype of a 4-bit base (bitsandbytes'
    `bnb_4bit_compute_dtype`: its weights are dequantised to it in every forward). Adapters always
    train in float32. 'auto': bfloat16 for a 4-bit base on CUDA (the QLoRA setting), float32 in
    every other case (a float base anywhere; a 4-bit base on CPU, where bfloat16 matmuls are slow)."""
    quantization: str = opt("none", choices=("none", "nf4", "fp4"))
    """Load the base in 4 bit with bitsandbytes (QLoRA, Dettmers et al. 2023): every linear layer but
    the output head becomes a bitsandbytes Linear4bit, blocks of 64 weights sharing one absmax scale.
    'nf4': 4-bit NormalFloat (the QLoRA paper's data type, best for normally distributed weights);
    'fp4': 4-bit float. Runs on CPU (bitsandbytes' CPU backend) and CUDA; LLaMA-Factory calls this
    `quantization_bit: 4` + `quantization_type`, axolotl `load_in_4bit`."""
    double_quantization: bool = True
    """With a 4-bit base: quantise the absmax scales too (8-bit, blocks of 256), saving about 0.37 bits
    per weight (QLoRA's double quantisation; LLaMA-Factory's `double_quantization`, transformers'
    `bnb_4bit_use_double_quant`). Ignored without model.quantization."""
    trust_remote_code: bool = False
    """Allow model code shipped with a local model directory to run."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `path` is a hub id."""
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    """Where to run: 'auto' picks CUDA when present."""
    attn_implementation: str = opt("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    """Attention kernel, passed to transformers: 'sdpa' (torch scaled_dot_product_attention), 'eager'
    (plain matmuls), 'flash_attention_2' (the flash-attn package; CUDA with a bfloat16/float16 base).
    'auto': flash_attention_2 when it can run here, else transformers' default (sdpa where the model
    supports it). A kernel that cannot run here is a recipe error."""


@dataclass
class RouterConfig:
    """Routing of mixture-of-experts types (`router:`); plain LoRA ignores it."""

    type: str = opt("soft", choices=("soft", "top_k"))
    """'soft': every expert, softmax weights; 'top_k': k experts, renormalised gates."""
    top_k: int = opt(2, min=1)
    """k for top_k routing."""
    temperature: float = opt(1.0, min=0, min_exclusive=True)
    """Softmax temperature of the gates."""
    jitter: float = opt(0.0, min=0)
    """Multiplicative uniform noise on router input during training (0 disables)."""
    init_std: float = opt(0.02, min=0)
    """Standard deviation of the router weight initialisation."""
    balance_loss: str = opt("none", choices=("none", "mole", "switch", "cv2"))
    """Balance loss added to the task loss (see docs/METHODS.md)."""
    balance_weight: float = opt(0.0, min=0)
    """Weight alpha of the balance loss."""
    z_loss_weight: float = opt(0.0, min=0)
    """Weight of the router z-loss mean(logsumexp(logits)^2)."""
    balance_scope: str = opt("micro", choices=("micro", "global"))
    """Over which tokens the balance loss and the z-loss are taken (padding never counts). 'micro': each
    forward's, i.e. one micro-batch of one process, averaged over micro-batches and processes (the usual
    implementation; it pushes every micro-batch towards uniform load, and 2 processes differ from 1).
    'global': the whole optimizer step's, over all gradient-accumulation micro-batches and processes, with
    exact gradients (Qiu et al. 2025, "Demons in the Detail"; docs/METHODS.md): 1 process and N processes, and
    grad_accum 1 and M, train the same adapter. Costs one all-reduce of 2N + 2 numbers per routed layer per
    micro-batch, and, with train.grad_accum > 1, one extra forward without gradients per micro-batch.
    The default is 'micro' by the routing-balance studies (README): 'global' kept more specialisation, all
    near uniform, and cost exact match on data/disjoint."""
    init_centroids: str | None = None
    """Safetensors file of K-means centroids (K, d) written by `moetune cluster-heads --embedder base
    --init-router`. When set, every router whose layer input has dim d (the base model's hidden size:
    q/k/v, gate/up, and o_proj, whose input has that size though it is the attention output) starts
    from the centroids, centred over the K rows (which the softmax
    ignores) and scaled so their entries have RMS init_std, the size of the random init. Routers of
    other layers (e.g. down_proj, whose input is the intermediate size) keep the random init. An
    approximation: the centroids are mean-pooled last hidden states, while each router reads its own
    layer's per-token input. K must equal expert.num_experts. None: random init.
    With any other embedder (the default minilm) `--init-router` writes instead one fitted router
    weight per projection ('weight.<module name>', moetune/train/router_fit.py: ridge least squares so that
    the base's prompt-mean input of each clustered row maps to its cluster); they are copied as is."""
    init: str = opt("random", choices=("random", "clusters"))
    """Where the routers start. 'random': N(0, init_std^2), or the file `init_centroids` names. 'clusters': when
    training starts, the training prompts are embedded (`init_embedder`) and split by K-means into K =
    expert.num_experts clusters, and every routed projection's router is fitted on the loaded base model so that
    each prompt's mean input maps to its cluster (ridge least squares; what `moetune cluster-heads --init-router`
    does, without a file made for one data set). The weights are kept in <output_dir>/router_init.safetensors,
    with router_init.json (cluster sizes, agreement with the data's domain column, fit accuracy); a resumed run
    reuses them. Clusters follow expert.init_seed, else train.seed. For hydralora, molora and mov; not with
    init_centroids or train.reference. In the README's routing studies only a clustered init made
    routers split the data by domain without labels ("Routers that specialise without labels")."""
    init_embedder: str = "minilm"
    """Sentence embedder of `init: clusters` (the prompts of data.train, or of every data.mix source): 'minilm'
    (all-MiniLM-L6-v2, shipped as a wheel), 'base' (the recipe's base model, mean last hidden state), 'tfidf'
    (word TF-IDF, no model) or a local model directory."""
    init_max_rows: int | None = opt(2000, min=1)
    """`init: clusters` clusters a seeded sample of this many training rows (None: all of them). The fit keeps
    each sampled row's mean input to every routed projection, once for projections that read the same input
    (q/k/v, gate/up): memory grows with it (about 0.4 MB a row for SmolLM2-135M with all-linear targets,
    0.8 GB at 2,000 rows)."""
    level: str = opt("token", choices=("token", "sequence"))
    """'token': gates per token (the papers' default). 'sequence': one gate vector per sequence, from the
    mean router logits (= W_g of the mean input) over its prompt tokens (the real tokens before its
    first target token), shared by all its tokens, as MoLE-style task routing; in generation the
    prompt's gates are kept for the new tokens. Packed rows route each segment on its own when the
    batch carries segment ids. Multiple-choice scoring (eval.multiple_choice) pools each question's
    prompt: never padding, never the answer being scored. MoLE's gates pool the same way."""
    temperature_end: float | None = opt(None, min=0, min_exclusive=True)
    """Anneal the gate temperature from `temperature` (first step) to this value (last step),
    geometrically: e.g. 2.0 -> 0.5 goes from soft towards sharp gates. Evaluation and export use this
    end value. None: a constant `temperature`."""
    lr_multiplier: float = opt(1.0, min=0, min_exclusive=True)
    """Router parameters train at train.lr times this, in their own optimizer param group."""
    weight_decay: float | None = opt(None, min=0)
    """Weight decay of the router parameters (None: train.weight_decay)."""
    domain_loss_weight: float = opt(0.0, min=0)
    """Weak supervision from the data's domain column (0: off). Adds, per routed layer, weight *
    -mean_d log q_d,a(d): q_d the mean gate over the batch's tokens of domain d, a(d) = (index of d
    among the sorted training domains) mod N, a fixed assignment. Computed from the detached layer
    input, so it trains the routers only. It imposes specialisation by label; it is not learned. For
    MoLE with `experts_from: per_domain` (experts in sorted domain order) a(d) is d's own LoRA."""


@dataclass
class MixSource:
    """One source of a training mixture (`data.mix: [{path: ..., ...}, ...]`)."""

    path: str = ""
    """A file, glob, directory, save_to_disk directory or hub id, as for `data.train`."""
    format: str = opt("auto", choices=FORMATS)
    """This source's format (see `data.format`)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column names of this source where they differ from the data section's: keys instruction,
    input, response, messages, tools, conversations, prompt, completion, chosen, rejected, text,
    domain (each `data.<key>_field`);
    e.g. {instruction: question, response: answer}."""
    domain: str | None = None
    """Domain label of every row of this source (None: its domain column, else 'all')."""
    weight: float | None = opt(None, min=0, min_exclusive=True)
    """Sampling weight: the mixture keeps its total size (the sum of the sources' rows after
    `max_rows`) and gives this source weight/sum(weights) of it, repeating its rows (seeded)
    when that is more than it has. None on every source: each source as is."""
    max_rows: int | None = opt(None, min=1)
    """Use at most this many rows of the source (a seeded sample)."""
    hub_subset: str | None = None
    """Subset when `path` is a hub id."""
    hub_split: str = "train"
    """Split when `path` is a hub id."""
    hub_revision: str | None = None
    """Revision when `path` is a hub id."""


@dataclass
class DataConfig:
    """Training and held-out data (`data:`)."""

    train: str = "data/default/train.jsonl"
    """Training data: a .jsonl, .json, .csv, .parquet or .arrow file, a glob of them
    ('shards/*.parquet'), a directory of such shards, a `datasets` save_to_disk directory, or a
    hub dataset id 'owner/name' read from the local HF cache (see `hub_subset`, `hub_split`,
    `hub_revision`). Tokenised once and cached (see `cache_dir`)."""
    validation: str | None = "data/default/validation.jsonl"
    """Validation data (periodic loss during training); None: carve `validation_split` off train."""
    test: str | None = "data/default/test.jsonl"
    """Held-out test data, scored before and after training when eval.split is 'test'."""
    format: str = opt("auto", choices=FORMATS)
    """'instruction': rows with instruction/response fields (Alpaca's instruction/input/output
    too); 'chat': rows with an OpenAI messages list of {role, content} (role 'tool' and an
    assistant's 'tool_calls' too, rendered by the tokenizer's chat template); 'sharegpt': a
    conversations list of {from: system|human|gpt, value}; 'prompt_completion': TRL's prompt and
    completion columns, both text (raw, no template) or both message lists (chat template), loss on
    the completion only; 'text': plain completion, loss on every token; 'auto' decides from the
    columns (messages, conversations, instruction, prompt and completion, text, in that order)."""
    instruction_field: str = "instruction"
    """Column holding the prompt in instruction format."""
    input_field: str = "input"
    """Optional column appended to the instruction (Alpaca style), used when present."""
    response_field: str = "response"
    """Column holding the target answer in instruction format."""
    messages_field: str = "messages"
    """Column holding the conversation in chat format."""
    tools_field: str = "tools"
    """Column holding a row's tool definitions (a list of JSON schemas, or that list as JSON text), given
    to the chat template as `tools` in chat and conversational prompt_completion rows (TRL's `tools`
    column); rows without it have none. The template must render them (checked per row)."""
    conversations_field: str = "conversations"
    """Column holding the conversation in sharegpt format."""
    prompt_field: str = "prompt"
    """Column holding the prompt in prompt_completion format (text, or a list of messages)."""
    completion_field: str = "completion"
    """Column holding the completion in prompt_completion format (text, or a list of messages)."""
    chosen_field: str = "chosen"
    """Column holding the preferred completion in preference format (text, or a list of messages)."""
    rejected_field: str = "rejected"
    """Column holding the dispreferred completion in preference format (text, or a list of messages).
    A pair whose chosen and rejected tokens are identical teaches nothing: it is skipped and counted."""
    text_field: str = "text"
    """Column holding the text in text (completion) format."""
    domain_field: str = "domain"
    """Column naming each row's domain, for per-domain scores (rows without it: 'all')."""
    template: str = opt("auto", choices=("auto", "chat", "plain"))
    """'chat': the tokenizer's chat template; 'plain': '### Instruction:/### Response:' text;
    'auto': chat when the tokenizer has a template."""
    system_prompt: str | None = None
    """System message put first in chat-template prompts (None: the template's default)."""
    max_length: int = opt(256, min=8)
    """Token limit per example; longer ones are cut at the end."""
    validation_split: float = opt(0.05, min=0, max=0.5)
    """Fraction of train held out as validation when `validation` is None (0: no validation)."""
    max_train_examples: int | None = opt(None, min=1)
    """Use only the first N training rows (after shuffling with `seed`)."""
    seed: int = 0
    """Seed for shuffling and splitting."""
    mask_history: bool = False
    """Multi-turn chat: False trains on every assistant turn; True only on the last one."""
    skip_bad_rows: bool = False
    """False: a malformed row stops the run naming file and row; True: such rows are skipped
    and counted (the first few named in the log and in `moetune data inspect`)."""
    hub_subset: str | None = None
    """Subset (config name) when a split is a hub dataset id."""
    hub_split: str = "train"
    """Split to read when `train` is a hub dataset id (validation/test ids use their own name)."""
    hub_revision: str | None = None
    """Revision of hub dataset ids (must be in the local HF cache when offline)."""
    cache_dir: str | None = None
    """Where tokenised datasets are cached, keyed by a fingerprint of the source files, these data
    settings and the tokenizer (None: $MOETUNE_DATA_CACHE, else ~/.cache/moetune/datasets or
    $MOETUNE_HOME/datasets). A rerun or --resume reuses the cache; a change makes a new one."""
    packing: bool | str = opt(False, choices=(False, True, "dataset"))
    """Several examples per row, with position ids restarting per example and attention kept inside
    each example (block-diagonal mask; flash-attention varlen when the model uses it); the first token
    of each example is never a target. true: the examples of each micro-batch go into as few rows of
    `max_length` tokens as fit (first-fit decreasing): the examples per step and the loss are those of
    unpacked training, less padding is computed. 'dataset': the whole epoch is packed into rows of
    `max_length` tokens (best-fit decreasing over the seeded epoch order, the rows then shuffled; TRL's
    `packing_strategy: bfd`, axolotl's `sample_packing`), and `train.batch_size` counts those ROWS, so a
    step trains a budget of batch_size * grad_accum * processes * max_length token positions rather
    than a number of examples (the loss stays the mean over the step's target tokens; sequence-level
    routing and domain statistics still see each example). Not for 'calm'."""
    group_by_length: bool = False
    """Unpacked training: batches of examples of similar length (sorted within megabatches of
    50 global batches, the batches shuffled), so less padding is computed."""
    mix: list[MixSource] = field(default_factory=list)
    """Several training sources, each with its own format, columns, domain label and weight or
    row cap (see `data.mix[i].*` below). When non-empty it replaces `train`."""
    num_proc: int | None = opt(None, min=1)
    """Processes for the tokenising `Dataset.map` (None: the CPU count for >= 20k rows, else 1)."""


MIX_COLUMNS = tuple(f.name[: -len("_field")] for f in fields(DataConfig) if f.name.endswith("_field"))
"""Keys of `data.mix[i].columns`: each names the column of a `data.<key>_field`."""


@dataclass
class TrainConfig:
    """Optimisation (`train:`)."""

    epochs: float = opt(1.0, min=0, min_exclusive=True)
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = opt(0, min=0)
    """Optimizer steps to run; 0 derives them from epochs."""
    batch_size: int = opt(8, min=1)
    """Examples per micro-batch on each process."""
    grad_accum: int = opt(1, min=1)
    """Micro-batches per optimizer step; global batch = batch_size * grad_accum * processes."""
    optimizer: str = opt("adamw", choices=("adamw", "sgd"))
    """Optimizer."""
    lr: float = opt(2e-4, min=0, min_exclusive=True)
    """Peak learning rate."""
    scheduler: str = opt("cosine", choices=("cosine", "linear", "constant"))
    """Learning-rate schedule after warmup."""
    warmup_steps: int = opt(0, min=0)
    """Linear warmup steps."""
    weight_decay: float = opt(0.0, min=0)
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    momentum: float = opt(0.9, min=0, max=1)
    """SGD momentum."""
    lora_plus_ratio: float = opt(1.0, min=0, min_exclusive=True)
    """LoRA+ (Hayou, Ghosh, Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): the B
    matrices train at lr * lora_plus_ratio, A (and everything else but the routers, see
    router.lr_multiplier) at lr; the paper suggests ratios around 2^4. 1: plain LoRA. For the types
    with B matrices: lora (any variant), hydralora (the B heads), molora (every expert's B) and MoLE's
    per-domain LoRAs. Only the optimizer changes (axolotl's `loraplus_lr_ratio`)."""
    objective: str = opt("sft", choices=("sft", "dpo", "orpo"))
    """What the adapter learns. 'sft': the causal-LM loss on response tokens. 'dpo': Direct Preference
    Optimization (Rafailov et al. 2023) on preference pairs (data in preference format), against a
    reference model (`train.reference`); see `train.loss_type`. 'orpo': Odds Ratio Preference
    Optimization (Hong et al. 2024): the chosen response's NLL plus beta * the odds-ratio loss, no
    reference model. Chosen and rejected of a pair go through one forward (concatenated), so routed
    experts' auxiliary losses count once per pair. TRL's DPOTrainer / ORPOTrainer, axolotl's `rl`."""
    beta: float = opt(0.1, min=0, min_exclusive=True)
    """dpo: the KL strength beta of the implicit reward beta * log(pi / pi_ref) (TRL's `beta`); with
    loss_type ipo, IPO's tau (the target margin is 1 / (2 beta)). orpo: the weight lambda of the
    odds-ratio term (TRL's ORPO `beta`). LLaMA-Factory's `pref_beta`."""
    loss_type: str = opt("sigmoid", choices=("sigmoid", "ipo"))
    """dpo's loss on the reward margin h = log(pi/pi_ref)(chosen) - log(pi/pi_ref)(rejected) (TRL's names):
    'sigmoid': -log sigmoid(beta h), the DPO paper's loss, log-probs summed over response tokens;
    'ipo': (h' - 1/(2 beta))^2 (Azar et al. 2023), h' from log-probs averaged over each response's
    tokens, as TRL does. Ignored by sft and orpo."""
    reference: str | None = None
    """dpo's reference model. None: the base model with the adapters switched off (no second copy of
    the weights; a fresh adapter starts equal to it). A run directory (or its adapter directory), for
    DPO after SFT: the policy starts from that run's adapter and the reference is a frozen copy of it
    (TRL's `ref_adapter_name` setup for an SFT-ed PEFT model); the recipe's expert section must match
    that adapter."""
    max_grad_norm: float = opt(1.0, min=0)
    """Clip the gradient norm to this (0 disables)."""
    precision: str = opt("auto", choices=("auto", "fp32", "bf16", "fp16"))
    """Compute precision of training (TRL's / transformers' `bf16`, `fp16`). 'bf16': the forward runs under
    bfloat16 autocast on CPU and GPU alike, so the base's and the adapters' matmuls run in bf16 forward and
    backward, while the adapter master weights, their gradients and the optimizer state stay float32 and the
    loss and the routers are computed in float32 (about 2x the matmul speed on CPUs with avx512_bf16/AMX and
    on GPUs). 'fp16': autocast on GPU with loss scaling; on CPU it trains fp32. 'fp32': no autocast (a
    bfloat16 base then meets float32 adapters: their part runs in float32). 'auto': 'bf16' when
    model.dtype is bfloat16, else 'fp32'."""
    distributed: str = opt("ddp", choices=("ddp", "fsdp"))
    """How several processes (`accelerate launch` / `torchrun`) share the work. 'ddp': each holds the
    whole model, gradients are all-reduced. 'fsdp': FSDP2 (torch fully_shard) shards the frozen base
    and the adapters over the processes per decoder block, for models that do not fit one device;
    checkpoints and the saved adapter hold full tensors, and --resume works. One process: no effect."""
    gradient_checkpointing: bool = False
    """Activation checkpointing (non-reentrant) of every decoder block: activations are recomputed in
    the backward instead of kept, trading about one extra forward for much less activation memory.
    Same loss, auxiliary losses, routing statistics and gradients as without (every expert type)."""
    seed: int = 0
    """Seed of adapter init, data order and dropout."""
    eval_every: int = opt(0, min=0)
    """Validation loss every N optimizer steps (0: only at the end)."""
    save_every: int = opt(0, min=0)
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = opt(2, min=1)
    """How many most recent checkpoints to keep."""
    log_every: int = opt(10, min=1)
    """Append a metrics.jsonl line every N optimizer steps."""
    eval_before: bool | None = None
    """Score the held-out split (eval.split) before training, for the before/after summary. None: when the
    stages include 'eval' (stages=[train] scores nothing); true / false: always / never."""
    stop_after: int = opt(0, min=0)
    """Stop (as if interrupted) after N optimizer steps, keeping the schedule of the full run;
    resume later with --resume. 0 disables."""
    report_to: list[str] = opt(factory=list, choices=("tensorboard", "wandb", "mlflow"))
    """Experiment trackers that also receive every metrics.jsonl row (loss, lr, grad norm, tokens/s,
    validation loss, aux losses; for routed types the per-block routing entropy and expert load of
    the step's last micro-batch), as in transformers' TrainingArguments.report_to. 'tensorboard'
    needs the tensorboard package (the 'tensorboard' extra of moetune); 'wandb' and 'mlflow' need
    their packages and their own login/tracking settings. Empty: metrics.jsonl (and curves.png) only."""
    logging_dir: str | None = None
    """TensorBoard event directory (None: <output_dir>/tensorboard)."""


@dataclass
class EvalConfig:
    """Evaluation (`eval:`)."""

    split: str = opt("test", choices=("validation", "test"))
    """Held-out split scored for loss and exact match."""
    generation: bool = True
    """Score greedy generation exact match per domain."""
    max_new_tokens: int = opt(24, min=1)
    """Generation length limit for exact match."""
    batch_size: int = opt(32, min=1)
    """Batch size for evaluation."""
    max_examples: int | None = opt(None, min=1)
    """Score only the first N held-out rows."""
    multiple_choice: list[str] = field(default_factory=list)
    """Multiple-choice JSONL files (see `moetune data mmlu`) scored by answer-letter likelihood."""
    mc_chat_template: bool | None = None
    """Wrap multiple-choice prompts in the chat template (None: when the tokenizer has one)."""
    mc_format: str = opt("letters", choices=("letters", "cloze"))
    """Multiple-choice scoring: 'letters' (next-token log-prob of A-D after the listed options) or
    'cloze' (log-likelihood per character of each answer text, options not shown; lighteval/SmolLM2
    style). In cloze mode `mc_chat_template: null` means no chat template."""


@dataclass
class MergeConfig:
    """Folding adapters into the base (`merge:`)."""

    dequantize: bool = False
    """Required (true) to merge into a 4-bit base: it is dequantised first."""
    dtype: str = opt("float32", choices=("float32", "bfloat16", "float16"))
    """Dtype of the saved merged model."""


@dataclass
class ExportConfig:
    """What `export` writes (`export:`)."""

    kind: str = opt("adapter", choices=("adapter", "merged", "both"))
    """'adapter': a PEFT adapter directory; 'merged': a full model; 'both'."""
    dir: str | None = None
    """Export directory (None: <output_dir>/export)."""
