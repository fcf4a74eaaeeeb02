"""What a run on several on-demand instances pays for their link: the gradients every optimizer
step sends over ethernet, against the step's compute, for the orchestrator's model. These are the
figures docs/nodes.md works out for depth 20. The launcher may not import torch, so the model's
parameters are counted here with arithmetic; a test checks the count against nanochat/gpt.py."""

from nanochat.launcher.cost import money
from nanochat.launcher.errors import EXIT_USAGE, LaunchError

# The gpu profile's model: config_from_depth's defaults (nanochat/gpt.py) with the 65,536-token
# vocabulary run_aquarat_small.sh trains, at its default --depth.
VOCAB, ASPECT_RATIO, HEAD_DIM, VE_GATE_CHANNELS = 65536, 64, 128, 32
DEFAULT_DEPTH = 8
# scripts/plan_run.py's assumptions: tokens per optimizer step, an H100's bf16 dense peak, and
# the share of it training reaches.
BATCH_TOKENS, PEAK_TFLOPS, MFU = 524288, 989.0, 0.35
# Assumed: Lambda's API does not say how fast separate on-demand instances reach each other.
ETHERNET_GBIT_S = 100


def model_params(depth):
    """(every parameter, the budget's: all but the value-embedding tables) of config_from_depth."""
    n_embd = depth * ASPECT_RATIO
    n_head = max(1, n_embd // HEAD_DIM)
    while n_embd % n_head:
        n_head -= 1
    with_value_embed = (depth + 1) // 2  # every second layer, counted back from the last
    # per layer: q, k, v and the output projection (4 n^2), the MLP (8 n^2); a value embedding's
    # gate reads the first channels into one weight per kv head (n_kv_head = n_head)
    blocks = 12 * n_embd**2 * depth + with_value_embed * min(VE_GATE_CHANNELS, n_embd) * n_head
    budget = blocks + 2 * VOCAB * n_embd  # + the token embedding and lm_head
    return budget + with_value_embed * VOCAB * n_embd, budget


def depth_of(run_args):
    """The --depth among the orchestrator's arguments, else its default."""
    for i, word in enumerate(run_args):
        value = None
        if word == "--depth" and i + 1 < len(run_args):
            value = run_args[i + 1]
        elif word.startswith("--depth="):
            value = word.split("=", 1)[1]
        if value is not None:
            if not value.isdigit() or int(value) < 1:
                raise LaunchError(f"--depth {value!r} after -- is not a depth", EXIT_USAGE)
            return int(value)
    return DEFAULT_DEPTH


def sized(count):
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.0f} M"


def ethernet_paragraph(nodes, gpus, price_cents, run_args):
    """One paragraph for the user before anything is launched: the price of the N instances, and
    a step's time with the gradients exchanged over ethernet, against one instance."""
    depth = depth_of(run_args)
    params, budget = model_params(depth)
    gradients = 4 * params  # fp32, every parameter (the value-embedding tables included)
    # A ring all-reduce sends (and receives) 2 (N-1)/N times the gradients over each node's link
    # per optimizer step: the reduce-scatter half and the all-gather half, (N-1)/N each.
    sent = 2 * (nodes - 1) / nodes * gradients
    exchange = sent / (ETHERNET_GBIT_S * 1e9 / 8)
    # 6 FLOPs per budget parameter and token (forward and backward), as scripts/plan_run.py
    one_instance = 6 * budget * BATCH_TOKENS / (gpus * PEAK_TFLOPS * 1e12 * MFU)
    compute = one_instance / nodes
    step = compute + exchange  # no overlap assumed: the exchange follows each backward pass
    if step >= one_instance:
        verdict = f"{step / one_instance:.1f}x slower than one instance"
    else:
        verdict = f"{one_instance / step:.1f}x faster than one instance"
    return (
        f"--nodes {nodes}: {nodes} instances x {money(price_cents)}/hour = "
        f"{money(nodes * price_cents)}/hour. Lambda's on-demand instances have no InfiniBand "
        f"between them: the nodes exchange their gradients over ethernet. Depth {depth} has "
        f"{sized(params)} parameters, {gradients / 1e9:.1f} GB of fp32 gradients, of which a "
        f"ring all-reduce sends 2 x ({nodes}-1)/{nodes}, {sent / 1e9:.1f} GB, over each node's "
        f"link every optimizer step: {exchange:.2f} s at an assumed {ETHERNET_GBIT_S} Gbit/s "
        "(Lambda does not publish the speed; measure it with iperf3 between two instances). The "
        f"step's compute ({sized(budget)} parameters x 6 FLOPs x {BATCH_TOKENS:,} tokens at "
        f"{MFU:.0%} of {PEAK_TFLOPS:g} TFLOP/s, an H100's peak, per GPU, {nodes * gpus} GPUs) "
        f"takes {compute:.2f} s, so a step takes about {step:.2f} s against {one_instance:.2f} s "
        f"on one instance: {verdict}, at {nodes}x the price. Several nodes pay off over "
        "InfiniBand (a 1-Click Cluster, with `deploy --hosts`: docs/nodes.md)."
    )
