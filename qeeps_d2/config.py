"""``add_qeeps_config``: every configuration key QEEPS adds to Detectron2's defaults; and what a
config means beyond single keys: the epoch schedule, whether its model is query-guided, the
cascade's K."""
import logging

from detectron2.config import CfgNode as CN

logger = logging.getLogger(__name__)


def add_qeeps_config(cfg):
    """Add the QEEPS keys to a Detectron2 config, in place. Call before ``merge_from_file``."""
    _C = cfg

    _C.MODEL.QEEPS = CN()
    # Dimension of the L2-normalised re-identification embedding (the OIM feature).
    _C.MODEL.QEEPS.EMBED_DIM = 256
    # Run the network's convolutions in channels-last (NHWC) memory format (their weights are
    # converted when the model is built; activations follow). Same results up to float rounding;
    # on the CPU (oneDNN) faster (benchmarks/channels_last.py); SynthPS configs turn it on.
    _C.MODEL.QEEPS.CHANNELS_LAST = False
    # Which res5 ClsNet and RegNet read: "shared" = the identity path's (the paper's ClsIdenNet,
    # one res5 for detection and re-id); "separate" = their own copy (started from the same
    # weights), while the identity res5 embeds the final regressed boxes (SeqNet-style), so the
    # two tasks do not fight over one head.
    _C.MODEL.QEEPS.DET_HEAD = "shared"
    # Where the identity path (DET_HEAD "separate" only) pools its boxes.
    _C.MODEL.QEEPS.ID_POOLER = CN()
    # "" = where the detector pools (ROI_HEADS.IN_FEATURES, res4: the paper's path). A stage
    # before it (e.g. "res2", which MODEL.RESNETS.OUT_FEATURES must then list) = each box is
    # ROI-pooled there at RESOLUTION and the later backbone stages (with the QSSE weights of
    # its pair) run on it before res5: every person reaches res3..res5 at one scale, as a crop
    # resized to RESOLUTION x the stage's stride would (SynthPS: 48 x 96 crops, res2 at 24 x 12).
    _C.MODEL.QEEPS.ID_POOLER.IN_FEATURE = ""
    # (height, width) of the pooled boxes.
    _C.MODEL.QEEPS.ID_POOLER.RESOLUTION = (24, 12)
    # The identity path runs its own copies of the later stages (roi_heads.id_trunk, started
    # from the backbone's when a checkpoint has none): the backbone's then serve only the RPN
    # and the detection head and learn at the heads' rate (SOLVER.TRUNK_LR_FACTOR spares them),
    # so detection and re-id stop fighting over res3..res4 as they did over res5 (DET_HEAD).
    _C.MODEL.QEEPS.ID_POOLER.OWN_STAGES = False
    # Per-term loss weights: lambda_1..7 of the paper's Eq. 3 (all 1 in the paper), named after
    # the terms of the loss dict.
    _C.MODEL.QEEPS.LOSS_WEIGHTS = CN()
    # L_cls, the Fast R-CNN person/background classification (ClsNet).
    _C.MODEL.QEEPS.LOSS_WEIGHTS.LOSS_CLS = 1.0
    # L_reg, the Fast R-CNN box regression (RegNet).
    _C.MODEL.QEEPS.LOSS_WEIGHTS.LOSS_BOX_REG = 1.0
    # L_rpn_o, the stock RPN objectness.
    _C.MODEL.QEEPS.LOSS_WEIGHTS.LOSS_RPN_CLS = 1.0
    # L_rpn_r, the stock RPN box regression.
    _C.MODEL.QEEPS.LOSS_WEIGHTS.LOSS_RPN_LOC = 1.0
    # L_oim, the OIM re-identification loss.
    _C.MODEL.QEEPS.LOSS_WEIGHTS.LOSS_OIM = 1.0
    # L_qrpn, the query-guided objectness of QRPN.
    _C.MODEL.QEEPS.LOSS_WEIGHTS.LOSS_QRPN = 1.0
    # L_sim, the QSimNet cross-entropy.
    _C.MODEL.QEEPS.LOSS_WEIGHTS.LOSS_SIM = 1.0

    # QSSE-Net (Sec. 4.1): query-guided Siamese squeeze-and-excitation in the BaseNet blocks.
    _C.MODEL.QEEPS.QSSE = CN()
    # Turn the QSSE blocks on (they need query-gallery pairs).
    _C.MODEL.QEEPS.QSSE.ENABLED = False
    # Backbone stages whose every residual block gets a QSSE excitation.
    _C.MODEL.QEEPS.QSSE.STAGES = ["res2", "res3", "res4"]
    # Reduction ratio r of the excitation bottleneck (2C -> 2C/r -> C).
    _C.MODEL.QEEPS.QSSE.REDUCTION = 16
    # Initial channel weight s of every QSSE block: 0 = PyTorch's default initialisation (s about
    # 0.5 * GATE_SCALE, which with scale 1 halves the residuals of a network trained without
    # QSSE); in (0, GATE_SCALE) = s starts there for any input (fc2 zeroed, bias
    # logit(INIT_GATE / GATE_SCALE)), so a QEEPS model fine-tuned from an OIM checkpoint starts
    # as that model (exactly at INIT_GATE 1 with GATE_SCALE 2).
    _C.MODEL.QEEPS.QSSE.INIT_GATE = 0.0
    # s = GATE_SCALE * sigmoid(.): 1 = the paper's Eq. 1; 2 puts s = 1 at the sigmoid's
    # steepest point, where fine-tuned gates can learn (at s = 0.99 of scale 1 they barely move).
    _C.MODEL.QEEPS.QSSE.GATE_SCALE = 1.0

    # QRPN (Sec. 4.2): query-guided objectness, summed per anchor with the stock RPN's.
    _C.MODEL.QEEPS.QRPN = CN()
    # Turn QRPN on (it needs query-gallery pairs).
    _C.MODEL.QEEPS.QRPN.ENABLED = False
    # Output size of the ROI pooling of the query box on the query's feature map.
    _C.MODEL.QEEPS.QRPN.POOLER_RESOLUTION = 7
    # Reduction ratio r of FC1 (C*P*P -> C/r) before FC2 (C/r -> C).
    _C.MODEL.QEEPS.QRPN.REDUCTION = 16
    # Anchors with IoU >= this with the query person in the gallery image are positives.
    _C.MODEL.QEEPS.QRPN.POSITIVE_IOU = 0.6
    # Anchors with IoU < this with EVERY person are negatives (other people are never negatives).
    _C.MODEL.QEEPS.QRPN.NEGATIVE_IOU = 0.3
    # Anchors sampled per gallery image for L_qrpn.
    _C.MODEL.QEEPS.QRPN.BATCH_SIZE_PER_IMAGE = 128
    # Target fraction of positives among the sampled anchors.
    _C.MODEL.QEEPS.QRPN.POSITIVE_FRACTION = 0.5

    # QSimNet (Sec. 4.3): (f_q - f_g)^2 -> BatchNorm -> FC -> 2-way softmax.
    _C.MODEL.QEEPS.QSIMNET = CN()
    # Turn QSimNet on; off, the similarity is the cosine of the embeddings.
    _C.MODEL.QEEPS.QSIMNET.ENABLED = False
    # Initialisation of QSimNet's FC: "default" (PyTorch's, the paper) or "distance" (starts as
    # the normalised squared embedding distance, i.e. ranking like the cosine of the OIM model it
    # is fine-tuned from; see qeeps_d2/modeling/qsimnet.py).
    _C.MODEL.QEEPS.QSIMNET.INIT = "default"
    # L_sim on the foreground ROIs only (people: the query person's ROIs positive, everyone
    # else's negative; QSimNet's BatchNorm statistics then come from people, as at inference,
    # where it ranks detections) instead of on every sampled ROI (False, background included).
    _C.MODEL.QEEPS.QSIMNET.LOSS_ON_PEOPLE = False
    # Pair-mode inference (every query-guided model, with or without QSimNet): detections with
    # a ClsNet score below this are removed before the NMS ranked by the query similarity.
    # -1 = TEST.PERSON_SEARCH.DET_THRESH: the protocol's threshold acts before the NMS. 0.01 =
    # the paper's 10^-2 (for QSimNet); the evaluation then drops detections below DET_THRESH
    # only after the NMS, so a poorly detected box very similar to the query can suppress the
    # target and then be dropped itself.
    _C.MODEL.QEEPS.QSIMNET.MIN_DET_SCORE = -1.0
    # Local similarity (qeeps_d2/modeling/local_similarity.py): QSimNet rows score each gallery
    # box by matching the query's identity-path cells (the map before res5) to the box's, plus
    # a learned share of the global cosine; fitted at the end of training on the labeled
    # training boxes. Needs QSIMNET.ENABLED and ID_POOLER with OWN_STAGES. Until it is fitted
    # (or when off), QSimNet's probability scores the pairs.
    _C.MODEL.QEEPS.QSIMNET.LOCAL = CN()
    _C.MODEL.QEEPS.QSIMNET.LOCAL.ENABLED = False
    # Projected cell dimension d.
    _C.MODEL.QEEPS.QSIMNET.LOCAL.DIM = 64
    # Fitting: iterations and anchors per iteration (Adam, lr LR), each anchor box against one
    # box of its identity, HARD_NEGATIVES of the HARD_POOL other-identity boxes nearest by
    # global cosine and RANDOM_NEGATIVES others (softmax loss).
    _C.MODEL.QEEPS.QSIMNET.LOCAL.FIT_ITERS = 250
    _C.MODEL.QEEPS.QSIMNET.LOCAL.FIT_BATCH = 128
    _C.MODEL.QEEPS.QSIMNET.LOCAL.HARD_NEGATIVES = 8
    _C.MODEL.QEEPS.QSIMNET.LOCAL.RANDOM_NEGATIVES = 8
    # 80: mAP of box retrieval on held-out identities (half of the pretraining set's; the head
    # fitted on train + the other half; a demo QEEPS model, seeds 0 / 1): pool 20 65.5 / 65.9,
    # 40 67.1 / 67.2, 80 67.8 / 67.9, 160 67.9 / 67.7 (global cosine 64.9)
    _C.MODEL.QEEPS.QSIMNET.LOCAL.HARD_POOL = 80
    _C.MODEL.QEEPS.QSIMNET.LOCAL.LR = 0.003
    # Fit on the identity-pretraining set's labeled boxes too (PRETRAIN; identities disjoint from
    # train and test), when that set is on disk: more identities, a head that generalises better.
    _C.MODEL.QEEPS.QSIMNET.LOCAL.PRETRAIN_IDS = True

    # OIM loss (lookup table of labeled identities + circular queue of unlabeled features).
    _C.MODEL.QEEPS.OIM = CN()
    # Size of the lookup table = labeled training identities; 0 = set by setup_cfg from the
    # first training data set (qeeps_d2.data.datasets.catalog.num_pids).
    _C.MODEL.QEEPS.OIM.NUM_PIDS = 0
    # Length of the circular queue of unlabeled features.
    _C.MODEL.QEEPS.OIM.QUEUE_SIZE = 5000
    # Scalar (1 / temperature) applied to the cosine similarities.
    _C.MODEL.QEEPS.OIM.SCALAR = 30.0
    # Momentum of the lookup-table update.
    _C.MODEL.QEEPS.OIM.MOMENTUM = 0.5
    # The OIM loss weight is 0 before this iteration (detector first), then ramps linearly to
    # its LOSS_WEIGHTS value over LOSS_WARMUP_ITERS. Training from scratch (SynthPS) needs it:
    # the OIM gradient (scalar 30) swamps the shared res5 features before the detector has
    # learned anything, and ClsNet then stays at its prior. 0 / 0 = the paper (always on).
    _C.MODEL.QEEPS.OIM.LOSS_START_ITER = 0
    # Length of the linear ramp of the OIM loss weight after LOSS_START_ITER (0 = a step).
    _C.MODEL.QEEPS.OIM.LOSS_WARMUP_ITERS = 0
    # Fraction of the re-id branch's gradient (OIM, QSimNet) that reaches the features it
    # shares with the detector (res5 and the backbone); the re-id head itself always gets all of
    # it. 1 = the paper. With AdamW and from-scratch features (SynthPS) the OIM gradient,
    # tens of times larger than the detection losses', otherwise takes over the shared updates
    # and undoes the detector.
    _C.MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE = 1.0
    # Initial lookup table: "zeros" (the paper, OIM) or "weights": before the first iteration of
    # a new run, each labeled identity's row is the mean embedding of its annotated training
    # boxes under MODEL.WEIGHTS (qeeps_d2.engine.hooks.OIMTableInit); for identity-pretrained
    # trunks, whose embeddings already separate people.
    _C.MODEL.QEEPS.OIM.LUT_INIT = "zeros"

    # Custom person-search data sets: JSON files (format: qeeps_d2/data/datasets/custom.py)
    # that setup_cfg registers under the "name" each holds, so that DATASETS.TRAIN / TEST can
    # name them, e.g. ("data/shop_train.json", "data/shop_test.json"); paths relative to the
    # working directory.
    _C.DATASETS.PERSON_SEARCH_FILES = ()

    # Training data: query-gallery pairs (used when any query-guidance switch is on).
    _C.DATALOADER.PAIRS = CN()
    # Gallery images sampled per query and epoch (-1 = every gallery image holding the query
    # person, the CUHK-SYSU recipe; 3 for PRW).
    _C.DATALOADER.PAIRS.GALLERIES_PER_QUERY = -1
    # Query-box jittering in training (paper Sec. 4.4, augmenting the QRPN positives): each side of
    # the query box moves by a uniform random amount of up to this fraction of the box width
    # (left/right) or height (top/bottom), then the box is clipped to the query image; in [0, 0.5)
    # so the box never empties. 0 = off; never applied at test time. The paper configs use 0.1.
    _C.DATALOADER.PAIRS.QUERY_BOX_JITTER = 0.0
    # Negative pairs (not in the paper, whose pairs all hold the query person): images without
    # the query's id paired with each query box per epoch; their people are all QSimNet
    # negatives, as the wrong people of a search's shortlist are. 0 = off (the paper's pairs).
    _C.DATALOADER.PAIRS.NEGATIVES_PER_QUERY = 0
    # How the negatives are chosen: "random" (any image without the query's id) or "oim_table"
    # (hard ones: drawn from the HARD_POOL x NEGATIVES_PER_QUERY images holding the ids most
    # similar to the query's in the OIM table of MODEL.WEIGHTS, the model being fine-tuned).
    _C.DATALOADER.PAIRS.NEGATIVES = "random"
    # "oim_table" negatives are drawn from the HARD_POOL x NEGATIVES_PER_QUERY hardest images
    # (>= 1; 1 = always the hardest ones).
    _C.DATALOADER.PAIRS.HARD_POOL = 4

    # Person-search evaluation.
    _C.TEST.PERSON_SEARCH = CN()
    # CUHK-SYSU-style gallery size (50, 100, ..., -1 = whole pool); ignored by PRW.
    _C.TEST.PERSON_SEARCH.GALLERY_SIZE = 100
    # PRW cross-camera protocol (gallery restricted to other cameras).
    _C.TEST.PERSON_SEARCH.CROSS_CAMERA = False
    # Detections with a score below this are dropped before matching (reference: 0.5).
    _C.TEST.PERSON_SEARCH.DET_THRESH = 0.5
    # Evaluate only the first K queries (0 = all); results are labelled partial.
    _C.TEST.PERSON_SEARCH.MAX_QUERIES = 0
    # Images (or query-gallery pairs) per forward pass at inference.
    _C.TEST.PERSON_SEARCH.BATCH_SIZE = 4
    # Cascade evaluation of query-guided models (qeeps_d2/evaluation/cascade.py): 0 = exhaustive
    # (every query-gallery pair); K > 0 = the same network query-agnostically over the gallery
    # images once, then pair mode only on each query's top-K images (results labelled cascade).
    _C.TEST.PERSON_SEARCH.CASCADE_TOPK = 0
    # Evaluate with ground-truth boxes (SeqNet's EVAL_USE_GT): the gallery detections are the
    # annotated person boxes of each gallery image, scored by the model (embedding, or QSimNet /
    # cosine similarity in pair mode) without RPN/QRPN, box regression or NMS; their det_score is
    # 1 so that no threshold drops them. Results are labelled: metrics "person_search_gt_boxes",
    # files <dataset>_gtboxes_{results.json.gz,metrics.json}. Re-identification alone.
    _C.TEST.PERSON_SEARCH.USE_GT_BOXES = False

    # Optimizer: "SGD" (Detectron2's, the paper's) or "ADAMW" (converges much faster when training
    # from scratch, as the CPU-sized SynthPS configs do; uses BASE_LR and WEIGHT_DECAY).
    _C.SOLVER.OPTIMIZER = "SGD"
    # Learning-rate factor of every parameter the OIM model has too (all but the QSSE excitations,
    # the QRPN's query excitation and head, and QSimNet) when fine-tuning a query-guided model
    # from an OIM checkpoint; 1.0 = one learning rate for all (the paper).
    _C.SOLVER.BASE_MODEL_LR_FACTOR = 1.0
    # Learning-rate factor of the ResNet trunk (backbone and res5 head), e.g. to keep what an
    # identity-pretrained trunk knows while the new detection and re-id heads learn at BASE_LR;
    # multiplies BASE_MODEL_LR_FACTOR where both apply. 1.0 = one learning rate (the paper).
    _C.SOLVER.TRUNK_LR_FACTOR = 1.0

    # Identity pretraining of the trunk (qeeps_d2/engine/pretrain.py): the stand-in for the
    # paper's ImageNet start where no model hub is reachable. The identity path (backbone, res5,
    # re-id head) is trained as a classifier of the identities of a SynthPS set generated with
    # another seed (disjoint from synthps_train / synthps_test), first on person crops, then on
    # whole scenes through the ROI path; MODEL.WEIGHTS then loads the result.
    _C.PRETRAIN = CN()
    # SynthPS seed of the pretraining set (the default data sets use seed 0).
    _C.PRETRAIN.SEED = 1
    # Labeled identities and scene images of the pretraining set.
    _C.PRETRAIN.NUM_IDS = 400
    _C.PRETRAIN.IMAGES = 1000
    # Stage 1: steps, crops per step and crop size (width, height) in pixels.
    _C.PRETRAIN.CROP_ITERS = 400
    _C.PRETRAIN.CROP_BATCH = 128
    _C.PRETRAIN.CROP_SIZE = (48, 96)
    # Stage 2: steps and scene images per step through the ROI path (labeled boxes as ROIs).
    _C.PRETRAIN.ROI_ITERS = 250
    _C.PRETRAIN.ROI_BATCH = 8
    # Background boxes per scene image in stage 2, for a person / background logit on the same
    # features (dropped afterwards, like the identity classifier).
    _C.PRETRAIN.ROI_BACKGROUND = 8
    # Stage 2 also trains the detector (RPN, ClsNet + RegNet and, with MODEL.QEEPS.DET_HEAD
    # "separate", their res5) on the same scenes, and the checkpoint keeps it: detection
    # training then starts from features and heads that already find people.
    _C.PRETRAIN.DETECTION = False
    # AdamW learning rate (cosine decay in each stage) and weight decay.
    _C.PRETRAIN.LR = 0.002
    _C.PRETRAIN.WEIGHT_DECAY = 0.0005
    # Inverse temperature of the cosine classifier over the pretraining identities.
    _C.PRETRAIN.SCALE = 16.0

    # Schedule in epochs over the training records (images, or pairs for query-guided models):
    # EPOCHS > 0 overrides SOLVER.MAX_ITER and SOLVER.STEPS, see resolve_epoch_schedule.
    _C.SOLVER.EPOCHS = 0
    # Epochs after which the learning rate is multiplied by SOLVER.GAMMA (the paper: (1,) of 2).
    _C.SOLVER.EPOCH_STEPS = ()


def resolve_epoch_schedule(cfg, num_records: int) -> None:
    """Turn ``SOLVER.EPOCHS`` / ``SOLVER.EPOCH_STEPS`` into ``MAX_ITER`` / ``STEPS`` (in place).

    One epoch is ``ceil(num_records / SOLVER.IMS_PER_BATCH)`` iterations. No-op when EPOCHS is 0.
    """
    if cfg.SOLVER.EPOCHS <= 0:
        return
    per_epoch = max(1, -(-num_records // cfg.SOLVER.IMS_PER_BATCH))
    cfg.SOLVER.MAX_ITER = int(round(cfg.SOLVER.EPOCHS * per_epoch))
    cfg.SOLVER.STEPS = tuple(int(round(e * per_epoch)) for e in cfg.SOLVER.EPOCH_STEPS)


def is_query_guided(cfg) -> bool:
    """Whether the config's model is query-guided (any of QSSE, QRPN, QSimNet on): it trains on
    query-gallery pairs and searches pair by pair."""
    q = cfg.MODEL.QEEPS
    return bool(q.QSSE.ENABLED or q.QRPN.ENABLED or q.QSIMNET.ENABLED)


def cascade_topk(cfg) -> int:
    """Shortlist length K of cascade evaluation (TEST.PERSON_SEARCH.CASCADE_TOPK) for a
    query-guided model; 0 = exhaustive pair evaluation (always 0 for query-agnostic models)."""
    k = cfg.TEST.PERSON_SEARCH.CASCADE_TOPK
    if k < 0:
        raise ValueError(f"TEST.PERSON_SEARCH.CASCADE_TOPK must be >= 0, got {k}")
    if k and not is_query_guided(cfg):
        logger.warning("TEST.PERSON_SEARCH.CASCADE_TOPK %d ignored: the model is query-agnostic "
                       "(it already runs each gallery image once)", k)
        return 0
    return k
