"""VL-FAU: explainable AU recognition by vision-language joint learning, rebuilt on our BLIP-2 parts.

Paper: Ge, Fu, Chen, An, Sebe, Jose, "Towards End-to-End Explainable Facial Action Unit Recognition
via Vision-Language Joint Learning", ACM MM 2024, arXiv 2408.00644. No official code exists; the
structure below follows the paper's abstract and method overview (checked through public
summaries of arXiv 2408.00644v1): per-AU representations refined from the face representation,
a multi-label AU classifier, and two language tasks trained jointly with it, a *local* description
of each AU's muscle action generated from that AU's representation and a *global* description of
the whole face generated from the face representation; loss = AU loss + weighted local + weighted
global language losses. Language is supervision during training and the explanation at test time.

Where we differ, on purpose (we reuse the BLIP-2 parts the other two papers need):
- Visual side: the paper builds multi-scale "stem" features of a CNN backbone and refines per-AU
  features with a dual-level refinement module (DAIR). Here the per-AU representations are learned
  Q-Former queries (`per_au_queries` per AU) that sit beside the general queries and cross-attend to
  the image tokens (models/qformer.py, untouched: the concatenated queries enter via `query_embeds`).
- Language side: the paper uses a lightweight language module trained with the network. We offer
  both: the frozen LLM (LLaMA family or OPT) behind a projection (BLIP-2 soft prompt, default), or the same
  decoder class trained jointly (`train_language_model=True`, the paper's "lightweight" option).
- Local sentences come from our FACS verb table (vocab/phrases.py PARAPHRASES, one fixed
  phrasing per AU, with an intensity adverb when labelled), global ones from a record caption
  (`global_caption`, default the rule-based AU caption). Only *positive* AUs get a local sentence.
- AU loss: BCE with per-AU positive weights (`au_pos_weight`), not the paper's exact AU loss.

Phases: `encode_image` / `embed_features` -> `query_features` -> `au_logits` (classifier),
`local_prompt` / `global_prompt` -> `language_loss`; `losses` combines them, `explain` runs inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from einops import rearrange
from torch import nn

from expvl.models.generation import Decoder, GenerationConfig, build_decoder, generate
from expvl.models.llm import LLMConfig
from expvl.models.losses import au_bce
from expvl.models.position_code import image_position_code
from expvl.models.qformer import QFormer, QFormerConfig
from expvl.models.vision import VisionConfig, VisionEncoder
from expvl.vocab.facs import SYNTHFACS_AUS, au_name, sort_aus
from expvl.vocab.phrases import PARAPHRASES, find_aus, intensity_adverb


def _tiny_qformer() -> QFormerConfig:
    # the embedded default's Q-Former width (configs/schema.py) with 8 general queries; encoder_width
    # is replaced by the image encoder's width when the model is built
    return QFormerConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256, num_query_tokens=8,
                         max_position_embeddings=256, encoder_width=512, vocab_size=1000)


@dataclass
class VLFAUConfig:
    aus: list[str] = field(default_factory=lambda: list(SYNTHFACS_AUS))  # A, the AUs classified, in order
    vision: Optional[VisionConfig] = field(default_factory=lambda: VisionConfig.from_name("tiny-conv"))  # noqa: UP045
    #   None = no encoder: the model reads cached frozen-encoder tokens of width `feature_width`
    feature_width: int = 0  # Dv of cached image tokens; only used (and required) when vision is None
    qformer: QFormerConfig = field(default_factory=_tiny_qformer)  # its num_query_tokens = G general queries;
    #   built query-only (text_input / lm_head off): VL-FAU never feeds text to the Q-Former
    per_au_queries: int = 1  # P learned queries per AU (the AU's representation = its P outputs)
    llm: LLMConfig = field(default_factory=lambda: LLMConfig.from_name("tiny", vocab_size=1000))  # the decoder
    #   built when none is passed in; a loaded one (training/vlfau.py: any family of load_hf_llm, e.g. an
    #   OPTConfig) replaces it with its own config at run time
    train_language_model: bool = False  # False: frozen LLM (BLIP-2 soft prompt); True: the decoder trains
    #   jointly, the paper's lightweight language module
    local_weight: float = 1.0  # weight of the local (per-AU) description loss; 0 = ablation: not computed
    global_weight: float = 1.0  # weight of the global (whole-face) description loss; 0 = ablation
    pos_weight: list[float] = field(default_factory=list)  # per-AU BCE positive weight (A values, e.g. from
    #   `au_pos_weight` on the training labels); empty = 1 for every AU
    threshold: float = 0.5  # probability above which an AU is predicted present
    local_adverbs: bool = True  # local sentences carry the labelled intensity ("slightly raises ...")
    global_caption: str = "au_rule"  # record caption kind used as the global description target
    max_local_len: int = 32  # LLM tokens of a local sentence (BOS and EOS included)
    max_global_len: int = 128  # LLM tokens of a global description
    local_max_new_tokens: int = 24  # generation length limits at inference
    global_max_new_tokens: int = 64
    num_beams: int = 1  # 1 = greedy decoding of the explanations
    image_position: str = "auto"  # 2-D position code on the tokens after ln_vision (models/position_code.py
    #                               image_position_code): "auto" = only for towers without one (CNN maps)

    def __post_init__(self):
        if not self.aus:
            raise ValueError("VLFAUConfig.aus is empty")
        self.aus = [au_name(a) for a in self.aus]
        if len(set(self.aus)) != len(self.aus):
            raise ValueError(f"VLFAUConfig.aus lists an AU twice: {self.aus}")
        if self.per_au_queries < 1:
            raise ValueError(f"VLFAUConfig.per_au_queries must be >= 1, got {self.per_au_queries}")
        if self.local_weight < 0 or self.global_weight < 0:
            raise ValueError("VLFAUConfig.local_weight / global_weight must be >= 0")
        if self.pos_weight and len(self.pos_weight) != len(self.aus):
            raise ValueError(f"VLFAUConfig.pos_weight has {len(self.pos_weight)} values for {len(self.aus)} AUs")
        if self.vision is None and self.feature_width <= 0:
            raise ValueError("VLFAUConfig.vision is None (cached features): set feature_width to their width")

    @property
    def num_aus(self) -> int:
        return len(self.aus)

    @property
    def uses_language(self) -> bool:
        return self.local_weight > 0 or self.global_weight > 0


def local_description(au: str, intensity: float | None = None) -> str:
    """The local sentence of one AU: its muscle action ("The person raises the inner eyebrows.").

    One fixed phrasing per AU (the first "vp" paraphrase, which vocab/phrases.py recognises),
    so the sentence identifies the AU; the adverb follows the labelled intensity when given.
    """
    verb_phrase = PARAPHRASES[au_name(au)]["vp"][0].format(adv=intensity_adverb(intensity))
    return f"The person {verb_phrase}."


def au_pos_weight(aus: torch.Tensor, annotated: torch.Tensor | None = None, *,
                  max_weight: float = 20.0) -> torch.Tensor:
    """Per-AU BCE positive weights negatives / positives over annotated entries: (N, A) -> (A,).

    Rare AUs (BP4D AU23, DISFA AU9) are otherwise learned as "always absent"; the cap keeps an AU
    with a handful of positives from dominating the loss.
    """
    m = torch.ones_like(aus, dtype=torch.float) if annotated is None else annotated.float()
    pos = (aus.float() * m).sum(0)
    neg = ((1 - aus.float()) * m).sum(0)
    return (neg / pos.clamp(min=1.0)).clamp(min=1.0 / max_weight, max=max_weight)


def dice(a: Sequence[str], b: Sequence[str]) -> float:
    """2 |a & b| / (|a| + |b|); 1.0 when both are empty (nothing predicted, nothing said)."""
    a, b = set(a), set(b)
    return 1.0 if not a and not b else 2 * len(a & b) / (len(a) + len(b))


@dataclass
class Explanation:
    """What VL-FAU says about one face."""
    probs: dict[str, float]  # AU -> probability, for every classified AU
    predicted: list[str]  # AUs with probability > threshold, numeric order
    local: dict[str, str]  # one generated sentence per predicted AU
    global_text: str  # the generated whole-face description
    mentioned: list[str]  # classified AUs that the local + global texts say are present
    agreement: float  # Dice(predicted, mentioned)
    global_agreement: float  # Dice(predicted, classified AUs the global description alone mentions)
    local_consistency: float  # share of predicted AUs whose own sentence names exactly that AU (1.0 if none)


class AUBranch(nn.Module):
    """Per-AU learned queries and the per-AU classifier on their Q-Former outputs.

    The classifier has separate weights per AU (a (A, P*D) matrix, like per-AU linear heads): each
    AU's query already carries its identity, and a shared head would force every AU's evidence onto
    one direction. `query_tokens` keeps the name that models/optim.py exempts from weight decay.
    """

    def __init__(self, num_aus: int, per_au: int, width: int, init_std: float):
        super().__init__()
        self.num_aus, self.per_au = num_aus, per_au
        self.query_tokens = nn.Parameter(torch.randn(1, num_aus * per_au, width) * init_std)  # (1, A*P, D)
        self.classifier_weight = nn.Parameter(torch.randn(num_aus, per_au * width) * init_std)  # (A, P*D)
        self.classifier_bias = nn.Parameter(torch.zeros(num_aus))  # (A,)

    def logits(self, au_feats: torch.Tensor) -> torch.Tensor:
        """au_feats (B, A, P, D) -> (B, A)."""
        flat = rearrange(au_feats, "b a p d -> b a (p d)")
        return torch.einsum("bak,ak->ba", flat, self.classifier_weight) + self.classifier_bias


class VLFAU(nn.Module):
    def __init__(self, cfg: VLFAUConfig, *, vision: VisionEncoder | None = None, llm: Decoder | None = None):
        super().__init__()
        self.cfg = cfg
        if vision is None and cfg.vision is not None:
            vision = VisionEncoder(cfg.vision)
        self.vision = vision  # None: cached tokens only
        width = vision.width if vision is not None else cfg.feature_width
        self.ln_vision = nn.LayerNorm(width)
        code = image_position_code(vision, cfg.image_position) if vision is not None else None
        self.register_buffer("image_pos", code, persistent=False)  # a function of the tower, not saved
        # the Q-Former's own query_tokens are the G general queries (loadable from BLIP-2 checkpoints)
        qcfg = replace(cfg.qformer, text_input=False, lm_head=False, encoder_width=width)
        self.qformer = QFormer(qcfg)
        D = qcfg.hidden_size
        self.au = AUBranch(cfg.num_aus, cfg.per_au_queries, D, qcfg.initializer_range)
        self.llm = llm if llm is not None else build_decoder(cfg.llm)
        self.llm_proj = nn.Linear(D, self.llm.config.dim)
        pw = torch.tensor(cfg.pos_weight, dtype=torch.float) if cfg.pos_weight else torch.ones(cfg.num_aus)
        self.register_buffer("pos_weight", pw, persistent=False)  # (A,), from the config

    # ---- image side ------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> ln_vision(encoder tokens) (B, N, Dv)."""
        if self.vision is None:
            raise ValueError("this VL-FAU model has no image encoder (vision=None): pass cached features")
        return self.embed_features(self.vision(images))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Cached frozen-encoder tokens (B, N, Dv) -> ln_vision(tokens) [+ position code]."""
        x = self.ln_vision(features.float())
        return x if self.image_pos is None else x + self.image_pos

    def query_features(self, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """General and per-AU queries refined over the image tokens (B, N, Dv).

        Returns {"all": (B, G + A*P, D), "general": (B, G, D), "au": (B, A, P, D)}.
        """
        B = image_embeds.shape[0]
        G = self.qformer.cfg.num_query_tokens
        queries = torch.cat([self.qformer.query_tokens, self.au.query_tokens], dim=1).expand(B, -1, -1)
        hidden = self.qformer.encode_queries(image_embeds, query_embeds=queries)["hidden"]
        au = rearrange(hidden[:, G:], "b (a p) d -> b a p d", p=self.cfg.per_au_queries)
        return {"all": hidden, "general": hidden[:, :G], "au": au}

    def au_logits(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, A) AU logits from the per-AU features."""
        return self.au.logits(feats["au"])

    # ---- language side ---------------------------------------------------------------------------

    def local_prompt(self, feats: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Soft prompts of K (face, AU) pairs: index (K, 2) rows [b, a] -> (K, P, d_llm)."""
        return self.llm_proj(feats["au"][index[:, 0], index[:, 1]])

    def global_prompt(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Soft prompt of the whole face, every query output: (B, G + A*P, d_llm)."""
        return self.llm_proj(feats["all"])

    def language_loss(self, prompt: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        """LM loss on `labels` (K, T) (-100 = none) after the soft prompt (K, P, d): [prompt | ids]."""
        return self.llm.prefixed_loss(prompt, ids, mask, labels)

    # ---- the joint objective -----------------------------------------------------------------------

    def losses(self, image_embeds: torch.Tensor, aus: torch.Tensor, au_mask: torch.Tensor | None = None, *,
               local_ids: torch.Tensor | None = None, local_mask: torch.Tensor | None = None,
               local_labels: torch.Tensor | None = None, local_index: torch.Tensor | None = None,
               global_ids: torch.Tensor | None = None, global_mask: torch.Tensor | None = None,
               global_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """loss = BCE + local_weight * L_local + global_weight * L_global.

        Args:
            image_embeds: (B, N, Dv) after ln_vision. aus, au_mask: (B, A) labels, annotated flags.
            local_*: K (face, AU) pairs, one per positive AU: ids/mask/labels (K, T), index (K, 2).
            global_*: (B, T) whole-face descriptions.
        A language loss whose weight is 0 is not computed (the ablation), and its inputs may be None.
        """
        feats = self.query_features(image_embeds)
        logits = self.au_logits(feats)
        loss_au = au_bce(logits, aus, annotated=au_mask, pos_weight=self.pos_weight)
        out = {"loss_au": loss_au, "logits": logits.detach()}
        loss = loss_au
        if self.cfg.local_weight > 0:
            if local_index is None:
                raise ValueError("local_weight > 0 needs local_ids / local_mask / local_labels / local_index")
            if local_index.shape[0]:
                out["loss_local"] = self.language_loss(self.local_prompt(feats, local_index), local_ids,
                                                       local_mask, local_labels)
            else:  # no positive AU in the batch: a zero that still touches the graph (DDP)
                out["loss_local"] = self.llm_proj.weight.sum() * 0.0
            loss = loss + self.cfg.local_weight * out["loss_local"]
        if self.cfg.global_weight > 0:
            if global_ids is None:
                raise ValueError("global_weight > 0 needs global_ids / global_mask / global_labels")
            out["loss_global"] = self.language_loss(self.global_prompt(feats), global_ids, global_mask,
                                                    global_labels)
            loss = loss + self.cfg.global_weight * out["loss_global"]
        out["loss"] = loss
        return out

    # ---- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, prompt: torch.Tensor, tokenizer, max_new_tokens: int) -> list[str]:
        if prompt.shape[0] == 0:
            return []
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=self.cfg.num_beams,
                               eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
        seqs = generate(self.llm, inputs_embeds=prompt.to(self.llm.dtype), attention_mask=mask,
                        config=cfg)["sequences"]
        return [tokenizer.decode(row).strip() for row in seqs]

    @torch.no_grad()
    def explain(self, image_embeds: torch.Tensor, tokenizer, *, threshold: float | None = None) -> list[Explanation]:
        """AU probabilities, predicted AUs, one sentence per predicted AU, a global description, agreement.

        image_embeds (B, N, Dv) after ln_vision; tokenizer: the LLM's SPTokenizer (eos_id, pad_id, decode).
        """
        threshold = self.cfg.threshold if threshold is None else threshold
        feats = self.query_features(image_embeds)
        probs = self.au_logits(feats).sigmoid()  # (B, A)
        index = (probs > threshold).nonzero()  # (K, 2) rows [b, a], row-major: faces in order
        local_texts = self._generate(self.local_prompt(feats, index), tokenizer, self.cfg.local_max_new_tokens)
        global_texts = self._generate(self.global_prompt(feats), tokenizer, self.cfg.global_max_new_tokens)
        out = []
        for b in range(probs.shape[0]):
            rows = [k for k in range(index.shape[0]) if int(index[k, 0]) == b]
            local = {self.cfg.aus[int(index[k, 1])]: local_texts[k] for k in rows}
            predicted = sort_aus(local)
            ours = set(self.cfg.aus)
            said_globally = set(find_aus(global_texts[b])) & ours
            # text by text: a generated sentence may lack its full stop, and a mention must not bridge two
            mentioned = sort_aus(said_globally.union(*(set(find_aus(t)) & ours for t in local.values())))
            own = [find_aus(text) == [au] for au, text in local.items()]
            out.append(Explanation(
                probs={au: float(p) for au, p in zip(self.cfg.aus, probs[b])}, predicted=predicted,
                local={au: local[au] for au in predicted}, global_text=global_texts[b], mentioned=mentioned,
                agreement=dice(predicted, mentioned), global_agreement=dice(predicted, said_globally),
                local_consistency=sum(own) / len(own) if own else 1.0))
        return out
