"""The "Don't know" demo page (Streamlit). Start it with ``ood-ray demo``; what it computes is in
``ood_ray.serving.demo``, and its settings come from the environment variables in ``demo.ENV``."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from ood_ray.config import default_tracking_uri
from ood_ray.serving import demo
from ood_ray.serving.load import ModelLoadError, load_predictor

COLUMNS = 4
DONT_KNOW = "Don't know"


@st.cache_resource(show_spinner="loading the model...")
def _predictor(uri: str, tracking: str):
    return load_predictor(uri, tracking)


@st.cache_resource(show_spinner="reading sample images...")
def _samples(uri: str, tracking: str):
    return demo.samples(_predictor(uri, tracking))


def choose_model(settings: dict, tracking: str) -> str:
    """The model URI: the one given to ``ood-ray demo --model``, else a registered one."""
    if settings["model"]:
        st.sidebar.markdown(f"**Model** `{settings['model']}`")
        return settings["model"]
    try:
        choices = demo.registered_models(tracking)
    except ModelLoadError as e:
        st.error(str(e))
        st.stop()
    if not choices:
        st.error(
            f"No ood-ray model is registered in {tracking}. Register one with a sweep "
            "(`ood-ray tune --method dismax` registers `ood-ray-dismax`), or start the demo with "
            "`ood-ray demo --model URI|FOLDER`."
        )
        st.stop()
    names = [c.name for c in choices]
    name = st.sidebar.selectbox("Registered model", names, key="model_name")
    choice = choices[names.index(name)]
    version = st.sidebar.selectbox("Version", choice.versions, key="version")
    return demo.model_uri(choice, version)


def show_provenance(predictor, uri: str, tracking: str, ui: str | None) -> None:
    info = demo.provenance(predictor, uri, tracking, ui)
    with st.sidebar.expander("Provenance", expanded=True):
        for key in ("model", "method", "backbone", "score", "threshold score", "δ of the model", "run", "sweep", "note"):
            if info.get(key) is not None:
                st.markdown(f"**{key}**: `{info[key]}`")
        if info["metrics"]:
            st.dataframe(pd.Series(info["metrics"], name="value"))
        if info.get("link"):
            st.markdown(f"[Open the run in the MLflow UI]({info['link']})")


def show_answers(answers: list, delta: float) -> None:
    ok = [a for a in answers if not a.error]
    rejected = sum(a.unknown for a in ok)
    st.subheader(f"{rejected} of {len(ok)} images rejected as \"Don't know\" at δ = {delta:.4f}")
    cols = st.columns(COLUMNS)
    for i, a in enumerate(answers):
        with cols[i % COLUMNS]:
            if a.error:
                st.error(a.error)
                continue
            st.image(a.image, caption=a.name, width=112, clamp=True)
            st.markdown(f"**{a.name}** → **{DONT_KNOW if a.unknown else a.class_name}**")
            score = f"{a.score_name} = {a.score:.4f} · " if a.score_name != a.threshold_score else ""
            st.caption(f"{score}{a.threshold_score} = {a.threshold_value:.4f} vs δ = {delta:.4f}")
            st.bar_chart(pd.Series(a.probabilities, name="probability"), height=150)


def main() -> None:
    st.set_page_config(page_title="ood-ray: Don't know", layout="wide")
    st.title("Don't know")
    st.caption("A classifier that answers with a class, or \"Don't know\" when its OOD score is below δ.")
    settings = demo.settings()
    tracking = settings["tracking_uri"] or default_tracking_uri()
    uri = choose_model(settings, tracking)
    try:
        predictor = _predictor(uri, tracking)
    except (ModelLoadError, ValueError, OSError) as e:
        st.error(f"cannot load the model: {e}")
        st.stop()
    show_provenance(predictor, uri, tracking, settings["ui"])

    low, high = predictor.method.threshold_range
    start = predictor.delta if predictor.delta is not None else (low if math.isfinite(low) else 0.0)
    if math.isfinite(low) and math.isfinite(high):
        delta = st.sidebar.slider(f"δ on {predictor.threshold_score}", float(low), float(high), float(start), step=(high - low) / 1000, format="%.4f", key="delta")
    else:
        delta = st.sidebar.number_input(f"δ on {predictor.threshold_score}", value=float(start), format="%.4f", key="delta")

    uploads = st.file_uploader("Images (the model takes {}x{}, mode {})".format(*predictor.image_size, predictor.mode), accept_multiple_files=True, key="uploads")
    try:
        sample_sets = _samples(uri, tracking)
    except Exception as e:  # noqa: BLE001 - samples are optional: say why they are missing
        sample_sets = {}
        st.warning(f"no sample images: {type(e).__name__}: {e}")
    picked = st.multiselect("Samples from the benchmark's test sets", list(sample_sets), key="samples")
    items = [(u.name, u.getvalue()) for u in uploads or []] + [item for label in picked for item in sample_sets[label]]
    if not items:
        st.info("Upload images or pick samples to see the answers.")
        return
    show_answers(demo.answer(predictor, items, delta), delta)


main()
