"""Calibrated int8 rounding at convert time: GPTQ (Frantar et al., 2022) in the stored format.

The format stays what `quant.quantize_weight` writes (int8 weight + one symmetric scale per
output channel, scale = row absmax / 127), so stores and kernels do not change; only which
integer each weight rounds to does. Rounding to nearest treats every input channel alike;
GPTQ rounds one input column at a time and spreads each column's rounding error over the
columns not yet rounded, weighted by the inverse Hessian H = X^T X of the layer's inputs X
on calibration text, so that the layer's output on real activations moves least.

`Calibrator` carries the calibration tokens' hidden states through the parts in model
order (embedding, blocks 0..n-1, head), as convert writes them: each part is built in fp32,
run once with hooks that accumulate H per group of Linears that read the same input
(q/k/v, gate/up), its Linears are rounded with GPTQ, and the part is run again with the
rounded weights to give the next part its input, so later layers correct for earlier
layers' rounding. The calibration text is built in (English prose and a Chinese passage,
original, never the evaluation text), so any store with a tokenizer can be calibrated.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_shard.models.base import Arch, ArchConfig, Part, on_meta
from llm_shard.models.cache import Batch, SequenceCache
from llm_shard.models.quant.linear import QMAX, quantize_weight

# GPTQ's settings as in the paper's reference code: 1% of the mean diagonal added to H,
# columns in blocks of 128, and "act order" (columns with the largest activations first),
# which with per-output-channel scales costs nothing in the format.
DAMP = 0.01
COLUMN_BLOCK = 128

CALIBRATION_TEXT = """\
Every lighthouse on this stretch of coast once had a keeper, and every keeper kept a log. \
The logs are plain books with green covers, and most of their pages say very little: the \
wind from the south-west at force four, visibility good, the lamp lit at 18:42 and put out \
at 06:15, two fishing boats and a cargo ship seen passing to the north. Read one page and \
you learn almost nothing. Read a whole year and a picture begins to form of a life measured \
in oil, wicks, weather and small repairs.

The keeper at Carrow Point from 1931 to 1958 was a man named Ellis Tremayne. He wrote in \
pencil, pressed hard, and he liked numbers. In March 1947 he recorded that the storm had \
broken eleven panes in the lantern room, that he had replaced nine of them with spare glass \
and covered the other two with tin, and that the lamp had stayed lit through all of it. In \
the margin, in smaller letters, he added: "Wife says I should have come down for supper. \
She is right, but the light comes first."

How does a lighthouse actually work? The light itself is not especially bright. An oil \
lamp of the kind Tremayne used gave off roughly as much light as a few dozen candles. What \
made it visible twenty miles out to sea was the lens, a tall cage of glass rings and prisms \
designed by Augustin Fresnel in the 1820s. Each ring bends the light a little, so that rays \
leaving the flame in every direction are turned into a single flat beam. The whole lens \
rotates on a bath of mercury, and because each lighthouse turns at its own speed and shows \
its own pattern of flashes, a sailor who counts the seconds between them can tell which \
light he is looking at, and so where he is.

Baking bread is a slower kind of engineering. Mix 500 grams of flour with 350 millilitres \
of warm water, ten grams of salt and a spoonful of yeast. Knead the dough for about ten \
minutes, until it feels smooth and springs back when you press it with a finger. Cover the \
bowl and leave it somewhere warm for an hour, or until the dough has doubled in size. Then \
knock it back, shape it into a loaf, let it rise again, and bake it at 220 degrees for \
thirty-five minutes. If the bottom sounds hollow when you tap it, the bread is done. If \
not, give it five more minutes and try again.

"Excuse me, is this the train to Leeds?"
"It is, but it's not stopping at Wakefield today. There's work on the line."
"Then how do I get to Wakefield?"
"Change at Doncaster and take the bus. It's slow, but it gets there."
"Thank you. Do you know when the next one leaves?"
"Quarter past. You've got time for a coffee if you're quick."

Scientists who study sleep have found that most adults need between seven and nine hours \
a night, yet surveys suggest that about a third of people regularly get less than six. The \
effects of a single short night are modest: slower reactions, a shorter temper, a stronger \
craving for sugar. The effects of months of short nights are harder to measure but appear \
to be larger, touching memory, mood, the immune system and the heart. One reason the \
research is difficult is that people are poor judges of their own sleep. Asked how long \
they slept, many will guess an hour more or an hour less than a monitor on their wrist \
records.

The committee met on Thursday to discuss the budget for the coming year. Income from \
membership fees had risen by four per cent, but the cost of heating the hall had risen by \
almost twice that, and the roof needed attention before winter. After a long discussion \
the members agreed to postpone the purchase of new chairs, to ask the council for a small \
grant towards the roof, and to hold a second fundraising concert in the spring. The \
treasurer promised to circulate revised figures within two weeks.

To sort a list of numbers, a computer can compare pairs of items and swap them whenever \
they are in the wrong order. This method, called bubble sort, is easy to understand but \
slow: for a list of a thousand items it may need nearly half a million comparisons. \
Cleverer methods divide the list into halves, sort each half separately, and then merge \
the two sorted halves together. Merge sort needs only about ten thousand comparisons for \
the same list, and the advantage grows as the list gets longer.

When Tremayne retired, the light at Carrow Point was converted to electricity and the \
keeper's cottage was sold. His last entry in the log is as short as the first: "Wind north, \
light airs. Lamp out 07:02. Handed over to the Board. All in order."
"""

CALIBRATION_TEXT_ZH = """\
清晨的集市总是最热闹的。卖菜的老人天还没亮就把新鲜的白菜、萝卜和青椒摆在摊位上，\
旁边的小店飘出刚出锅的包子和豆浆的香味。学生们背着书包匆匆走过，顺手买一个鸡蛋饼当早饭。\
到了八点左右，上班的人渐渐多起来，公交车站前排起了长队。一位年轻的母亲一手牵着孩子，\
一手提着装满水果的袋子，耐心地等待着。太阳慢慢升高，街道两旁的梧桐树投下斑驳的影子。\
有人说，城市的性格藏在它的早晨里：一天的忙碌从这里开始，生活的滋味也从这里展开。\
研究人员指出，规律的作息和均衡的饮食对健康非常重要，每天适量运动三十分钟，\
就能明显降低患心脏病的风险。
"""


def calibration_ids(tokenizer) -> list[list[int]]:
    """The built-in calibration text as token sequences (one per language)."""
    return [tokenizer.encode(text) for text in (CALIBRATION_TEXT, CALIBRATION_TEXT_ZH)]


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, damp: float = DAMP,
                  block: int = COLUMN_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of w (out, in) into quantize_weight's format, given H (in, in).

    Returns (q int8 (out, in), scales float32 (out,)), the scales quantize_weight's.
    """
    _, scales = quantize_weight(w)
    H = hessian.detach().double().clone()
    n = w.shape[1]
    dead = torch.diagonal(H) == 0  # an input never active in calibration: plain rounding
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True)
    H = H[perm][:, perm]
    H.diagonal().add_(damp * float(torch.diagonal(H).mean()))
    # Upper Cholesky factor of H^-1: row i holds column i's error-spreading weights.
    hinv = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    # Transposed, (in, out): each input column of w is a contiguous row, and so is each
    # rank-1 update's (faster than strided columns, the same bits).
    Wt = w.detach().float().t()[perm].contiguous()
    Qt = torch.empty_like(Wt)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, hinv1 = Wt[i1:i2], hinv[i1:i2, i1:i2]
        err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = W1[i]
            q = torch.round(col / scales).clamp_(-QMAX, QMAX)
            Qt[i1 + i] = q
            err = (col - q * scales) / hinv1[i, i]
            W1[i:].sub_(hinv1[i, i:, None] * err)
            err1[i] = err
        Wt[i2:].sub_(hinv[i1:i2, i2:].t() @ err1)
    Q = Qt[torch.argsort(perm)].t()
    return Q.to(torch.int8), scales


class Calibrator:
    """Runs the calibration tokens through the parts in order, rounding each part's chosen
    Linears with GPTQ. Call `quantize_part` for every part, embedding first."""

    def __init__(self, arch: Arch, cfg: ArchConfig, sequences: list[list[int]]) -> None:
        if not sequences or not all(sequences):
            raise ValueError("calibration needs at least one non-empty token sequence")
        self.arch, self.cfg = arch, cfg
        self.ids = torch.tensor([t for seq in sequences for t in seq])
        self.seq_lens = [len(seq) for seq in sequences]
        self.hidden: torch.Tensor | None = None  # (tokens, hidden): the next part's input
        # What the embedding found in the prompts (ChatGLM's prefix, CPM-2's encoder
        # length), which blocks need on every call, as in the pipeline's first step.
        self.prefixes = None

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    def _batch(self) -> Batch:
        return Batch.of(self.seq_lens, [SequenceCache() for _ in self.seq_lens], self.prefixes)

    def _run(self, module: nn.Module, part: Part) -> torch.Tensor:
        if part.kind == "embed":
            batch = self._batch()
            out = module(self.ids, batch)
            self.prefixes = batch.prefixes
            return out
        if self.hidden is None:
            raise RuntimeError(f"calibration reached {part} before the embedding")
        if part.kind == "block":
            return module(self.hidden, self._batch())
        return module(self.hidden)

    @torch.no_grad()
    def quantize_part(self, part: Part, tensors: dict[str, torch.Tensor],
                      int8: set[str]) -> dict[str, torch.Tensor]:
        """tensors: the part's float state dict; int8: the `<linear>.weight` keys to round.

        Returns the state dict to store: int8 `.weight` and float32 `.scales` for those
        keys, the other tensors unchanged.
        """
        if part.kind == "head" and not int8:  # a tied head: the embedding's int8 rows
            return dict(tensors)
        with on_meta():
            module = self.arch.build(self.cfg, part)
        module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True,
                               assign=True)
        linears = {name: m for name, m in module.named_modules()
                   if isinstance(m, nn.Linear) and f"{name}.weight" in int8}
        if set(int8) != {f"{name}.weight" for name in linears}:
            raise ValueError(f"{part}: not Linear weights: {sorted(int8 - set(tensors))}")
        # Linears fed the same input tensor share one Hessian: (input, H, [names]).
        groups: dict[int, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}

        def hook(name):
            def collect(_mod, inputs, _out):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                key = inputs[0].data_ptr()
                if key not in groups:  # the input stays referenced, so its address is unique
                    groups[key] = (inputs[0], x.T @ x, [])
                groups[key][2].append(name)
            return collect

        handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
        try:
            self._run(module, part)
        finally:
            for h in handles:
                h.remove()
        out = dict(tensors)
        for _, hessian, names in groups.values():
            w = torch.cat([linears[n].weight for n in names])
            q, scales = gptq_quantize(w, hessian)
            row = 0
            for n in names:
                rows = linears[n].out_features
                out[f"{n}.weight"], out[f"{n}.scales"] = q[row: row + rows], scales[row: row + rows]
                linears[n].weight.copy_(q[row: row + rows].float() * scales[row: row + rows, None])
                row += rows
        missing = int8 - {f"{n}.weight" for _, _, names in groups.values() for n in names}
        if missing:
            raise RuntimeError(f"{part}: calibration never ran {sorted(missing)}")
        if part.kind != "head":
            self.hidden = self._run(module, part)
        return out
