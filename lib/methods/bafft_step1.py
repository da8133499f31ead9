"""BAFFT step 1 (Yuan et al., "Birds of A Feather Flock Together", IEEE TIP 2022).

Output-space adversarial alignment (AdaptSegNet, one discriminator on the main output) plus
category- and instance-level alignment of the layer4 features f against memories of source
features.  One iteration of the released step-1 script (HibiscusYB/BAFFT), in ADVENT's step order:

1. D frozen.  Source: f_s, P_s = G(x_s); L_seg = CE(P_s↑, y_s); backward.
2. M = y_s brought to P_s's grid (nearest), kept where it equals argmax P_s, 255 elsewhere.
3. Stuff memories S_c (``stuff_slots`` = 50): per image and stuff class c in M, the pooled
   feature v = Σ f_s·[M=c] / Σ [M=c], written only if the classifier agrees (argmax head(v) = c).
4. Thing memories I_c (``thing_slots`` = 500): the ``top_k`` = 10 largest 8-connected regions of
   [M=c], pooled, same gate.
5. Target: f_t, P_t = G(x_t); its class regions ŷ_t = argmax P_t (step 2: the pseudo-labels).
6. Generator terms, backward:
       L_adv = BCE(D(σ(P_t↑)), source)
       L_cls = Σ_{c stuff, S_c ready} φ(min_j d(v_t^c, S_c[j]))       (c skipped if the head disagrees)
       L_ins = β_ins Σ_{c thing, I_c ready} 1/n_c Σ_r φ(min_j d(v_t^r, I_c[j]))   (no gate)
   with d(a, b) = mean_k |a_k - b_k|, from the second iteration on; a memory is ready after
   more writes than slots.  L_G = λ_adv L_adv + λ_cls L_cls + λ_ins L_ins (+ the ISIA terms).
7. D unfrozen: ½ BCE(D(σ(P_s↑)), source) + ½ BCE(D(σ(P_t↑)), target) on detached outputs.

``alignment`` chooses the category/instance terms:

- ``sim``: the released step-1 script (= SIM): φ(d) = d, β_ins = 1.
- ``isia`` (default): the paper's ISIA and AIM, already in step 1 as in the paper's first stage, in
  our form: AIM self-weighting φ(d) = d² with β_ins = ``beta_aim``, and
       L_ISIA = Σ_i d(c_s,i, c_t,i) + β Σ_i Σ_{k≠i} (1 + cos(c_s,i, c_t,k))/2
  on the class centroids of f: source over M, target over the target regions.
- ``isia`` with ``code_faithful: true``: code version A instead (an early step-2 script of the released
  code), for comparison:
  L_same + L_diff on the softmax maps, the target separation L_sep, φ(d) = d², β_ins = 10.

Our choices where the original (batch 1) leaves them open: memories and target matching work
per image and L_cls, L_ins, L_sep average over the images; ISIA centroids pool the whole batch;
source centroids and memories are detached, so only the target is pulled (the source graph is
freed before the target forward); version A's source softmax keeps its graph (retain_graph, as
the released code) and is resized to the target's grid when the crops differ.
"""
from __future__ import annotations

import torch

from lib.methods.parts.bafft import BafftAlignment
from lib.models.output import SegOutput


class BafftStep1(BafftAlignment):
    name = "bafft_step1"

    def target_regions(self, target: SegOutput, target_batch: dict) -> torch.Tensor:
        """ŷ_t = argmax P_t, no confidence threshold (as released)."""
        return target.logits.detach().argmax(dim=1)

    def target_supervision(self, target: SegOutput, target_batch: dict) -> dict[str, torch.Tensor]:
        return {}


METHOD = BafftStep1
