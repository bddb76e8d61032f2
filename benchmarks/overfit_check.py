"""Overfit check: can a model learn ONE real training image with exact box prompts?

Usage: python benchmarks/overfit_check.py nsam_t full|dec
Loss: pos-weighted BCE + dice over the whole low-res mask, Adam 1e-3, 150 steps, 8 objects.
Result on 2026-11-22 (idle 2-core CPU, nsam_t, full): IoU 0.004 -> 0.48 (step 100) -> 0.80 (step 125).
So the architecture learns. The same model under the trainer's recipe (dice + window focal or balanced focal)
stayed at train IoU ~0.02 for 1,600 steps, so look at the trainer's loss and prompt path first.
"""
import sys, time, numpy as np, torch, torch.nn.functional as F
from napari_sam.core import build_sam
from napari_sam.core.training.data import read_array, resize_pair
from napari_sam.core.training.simulate import mask_boxes
torch.manual_seed(0); torch.set_num_threads(2)
cfg = sys.argv[1]; mode = sys.argv[2]
m = build_sam(cfg).train()
d = '/work/shared/data/dsb2018_full/'
iid = '00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552'
s = resize_pair(read_array(d+'images/'+iid+'.png'), read_array(d+'labels/'+iid+'.tif'), m.img_size)
S = m.img_size
lab = np.zeros((S,S), np.int32); lab[:s.labels.shape[0], :s.labels.shape[1]] = s.labels
ids = s.ids[:8]
gt = torch.from_numpy(lab)[None] == torch.as_tensor(ids)[:, None, None]
x = m.preprocess(torch.from_numpy(s.image).permute(2,0,1)[None].float())
L = m.prompt_encoder.mask_input_size[0]
tgt = F.adaptive_avg_pool2d(gt[:, None].float(), L)
boxes = mask_boxes(gt)
params = m.mask_decoder.parameters() if mode == 'dec' else m.parameters()
opt = torch.optim.Adam(list(params) + (list(m.prompt_encoder.parameters()) if mode=='dec' else []), lr=1e-3)
t = time.time()
for it in range(151):
    emb = m.image_encoder(x) if mode != 'dec' else m.image_encoder(x).detach()
    sp, de = m.prompt_encoder(points=None, boxes=boxes, masks=None)
    low, iou = m.mask_decoder(emb.expand(len(ids), -1, -1, -1), m.prompt_encoder.get_dense_pe(), sp, de, False)
    p = torch.sigmoid(low)
    dice = 1 - (2*(p*tgt).sum((-1,-2)) + 1) / (p.sum((-1,-2)) + tgt.sum((-1,-2)) + 1)
    pos = tgt.mean().clamp(min=1e-3)
    bce = F.binary_cross_entropy_with_logits(low, tgt, pos_weight=torch.tensor((1-pos)/pos))
    loss = dice.mean() + bce
    opt.zero_grad(); loss.backward(); opt.step()
    if it % 25 == 0:
        with torch.no_grad():
            pr = low > 0; tt = tgt > 0.5
            iou_v = ((pr & tt).sum((-1,-2)).float() / (pr | tt).sum((-1,-2)).clamp(min=1)).mean()
        print(cfg, mode, it, round(float(loss), 3), 'iou', round(float(iou_v), 3), round(time.time()-t, 1), flush=True)
