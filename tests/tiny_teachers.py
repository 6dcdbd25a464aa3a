"""Tiny random teacher configs of both families, shared by the pipeline tests (dataset, student,
sampling): family -> (transformer config, tokenizer config, state-dict part names)."""

TINY = {
    "llamagen": (dict(dim=32, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10, multiple_of=16),
                 dict(codebook_size=64, codebook_embed_dim=4, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1],
                      z_channels=32, ch=32, num_res_blocks=1),
                 ("gpt", "vq")),
    "var": (dict(depth=2, embed_dim=32, num_heads=2, num_classes=10, patch_nums=[1, 2, 3], V=64, Cvae=4),
            dict(V=64, Cvae=4, ch=32, ch_mult=[1, 1], num_res_blocks=1, patch_nums=[1, 2, 3]),
            ("var", "vae")),
}
# text-to-image LlamaGen: 4 caption slots of dimension 8, 16x16 images (so that the digits extractor
# reads them). Not in TINY, whose families every class-conditional pipeline test runs.
TINY_T2I = {"llamagen-t2i": (dict(TINY["llamagen"][0], model_type="t2i", caption_dim=8, cls_token_num=4),
                             dict(TINY["llamagen"][1], encoder_ch_mult=[1, 1, 1], decoder_ch_mult=[1, 1, 1]),
                             TINY["llamagen"][2])}


def saved_teacher(family, directory, seed=0, edit=None):
    """A random tiny teacher of `family` (a TINY or TINY_T2I key) whose weights live in checkpoint files
    under `directory`
    -> (TeacherSpec pointing at the files, the teacher loaded back from them).
    edit: optional callable applied to the random teacher before it is saved."""
    import torch
    from distilled_decoding.teacher_spec import TeacherSpec

    cfg, tok_cfg, parts = {**TINY, **TINY_T2I}[family]
    family = family.split("-")[0]
    torch.manual_seed(seed)
    t = TeacherSpec(family, cfg, tokenizer_config=tok_cfg).load("cpu")
    if edit is not None:
        edit(t)
    paths = []
    for part in parts:
        p = directory / f"{part}.pt"
        torch.save({"model": getattr(t, part).state_dict()}, p)
        paths.append(str(p))
    spec = TeacherSpec(family, cfg, paths[0], tok_cfg, paths[1])
    return spec, spec.load("cpu")
