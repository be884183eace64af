"""The web demo (Gradio): upload an image, chat with streaming answers, one button per task, predicted
boxes drawn on the image with their phrases.

``create_demo(model_or_loader)`` builds the page; gradio is imported and the model loaded only
then, never at import (the original demo loaded its model when the script was imported). Each
browser session has its own :class:`~tinygptv.chat.Conversation` (image encoded once, KV cache
kept between turns); the model answers one request at a time across sessions (one shared
concurrency group), so sessions never race on it.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import gradio as gr
    from PIL.Image import Image

    from ..chat import Conversation
    from ..model.tinygptv import TinyGPTV

TASK_BUTTONS = {"caption": "Caption", "vqa": "VQA", "refer": "Refer", "grounding": "Grounding", "identify": "Identify"}
"""The task buttons, in page order: MiniGPT-v2's task identifiers (``detection`` is left to the API)."""
DEFAULT_INSTRUCTIONS = {"caption": "Briefly describe this image.", "grounding": "Describe this image in detail."}
"""What a task button asks when the question box is empty (the other tasks need the user's text: a
question, a referring expression, a box)."""
NEEDS_TEXT = {
    None: "Type a question first.",
    "vqa": "Type a question first.",
    "refer": "Type the phrase to locate, e.g. 'the red circle'.",
    "identify": "Type a box to identify, e.g. {<10><20><60><70>} (0-100 of the image).",
}
BOX_COLORS = ["#1f6feb", "#2da44e", "#bf8700", "#8250df", "#cf222e", "#1b7c83"]
"""Box colours, one per phrase in order of appearance."""
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
"""The page's fonts: the machine's own, so the page needs no font download (gradio's default theme
fetches Google fonts)."""


def respond(
    model: TinyGPTV,
    template: str,
    conversation: Conversation | None,
    image: Image | None,
    text: str,
    task: str | None,
    history: list[dict[str, Any]],
    **sampling: Any,
) -> Iterator[tuple[Conversation, list[dict[str, Any]], Any]]:
    """Answer ``text`` (or the task's default instruction) about ``image``, streaming.

    Yields ``(conversation, chat history, boxes)`` after each piece; ``boxes`` is the AnnotatedImage
    value ``(image, [((x1, y1, x2, y2), phrase), ...])`` once the answer has boxes, else None.
    Raises ``ValueError`` with a message for the user when there is nothing to ask.
    """
    question = (text or "").strip() or DEFAULT_INSTRUCTIONS.get(task, "")
    if not question:
        raise ValueError(NEEDS_TEXT.get(task, "Type a question first."))
    if conversation is None:
        conversation = model.chat(template)
        if image is not None:
            conversation.add_image(image)
    shown = f"[{task}] {question}" if task else question
    history = [*history, {"role": "user", "content": html.escape(shown)}, {"role": "assistant", "content": ""}]
    answer = ""
    for piece in conversation.stream(question, task, **sampling):
        answer += piece
        history[-1] = {"role": "assistant", "content": html.escape(answer)}
        yield conversation, history, None
    final = conversation.last_answer
    history[-1] = {"role": "assistant", "content": html.escape(final.text) or "(no answer)"}
    yield conversation, history, annotated_boxes(conversation, final.boxes)


def annotated_boxes(conversation: Conversation, boxes: list[dict[str, Any]]):
    """The AnnotatedImage value for ``boxes`` (pixel corners) on the conversation's first image."""
    if not boxes or not conversation.images:
        return None
    image = conversation.images[0]
    marks = []
    for k, item in enumerate(boxes):
        x1, y1, x2, y2 = (int(round(v)) for v in item["box"])
        marks.append(((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)), item.get("phrase") or f"box {k + 1}"))
    return image, marks


def create_demo(
    model_or_loader: TinyGPTV | Callable[[], TinyGPTV],
    template: str = "stage4",
    max_new_tokens: int = 128,
) -> gr.Blocks:
    """The Gradio page for a loaded model (or the model a zero-argument loader returns, called now)."""
    import gradio as gr
    from torch import nn

    model = model_or_loader if isinstance(model_or_loader, nn.Module) else model_or_loader()
    model.eval()
    name = model.config.name

    def new_image(image):  # a new image starts a new conversation, as in the original demo
        return None, [], None

    def clear(conversation):  # forget the turns, keep the image
        if conversation is not None:
            conversation.reset(keep_images=True)
        return conversation, [], None

    def handler(task: str | None):
        def run(text, image, conversation, history, max_tokens, temperature):
            sampling = {"max_new_tokens": int(max_tokens), "temperature": float(temperature)}
            try:
                steps = respond(model, template, conversation, image, text, task, history, **sampling)
                for k, (conversation, history, boxes) in enumerate(steps):
                    # the question box is emptied once, so typing during the answer is kept
                    yield conversation, history, _boxes_update(gr, boxes, first=k == 0), "" if k == 0 else gr.skip()
            except ValueError as err:
                raise gr.Error(str(err)) from None

        return run

    with gr.Blocks(title="TinyGPT-V", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## TinyGPT-V demo ({html.escape(name)})\nUpload an image, then ask about it or press a task "
            "button. Grounding answers draw their boxes on the image."
        )
        # A conversation holds its KV cache: drop it half an hour after its last use.
        conversation = gr.State(None, time_to_live=1800)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="image-input")
                boxes = gr.AnnotatedImage(label="Predicted boxes", elem_id="boxes")
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=360)
                question = gr.Textbox(label="Question", placeholder="Ask about the image", elem_id="question")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask-button")
                    reset = gr.Button("Clear", elem_id="clear-button")
                with gr.Row():
                    task_buttons = {
                        task: gr.Button(label, size="sm", elem_id=f"task-{task}")
                        for task, label in TASK_BUTTONS.items()
                    }
                with gr.Accordion("Decoding", open=False):
                    max_tokens = gr.Slider(1, 512, value=max_new_tokens, step=1, label="max new tokens")
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
        inputs = [question, image, conversation, chatbot, max_tokens, temperature]
        outputs = [conversation, chatbot, boxes, question]
        # One queue for every event, answers and image / clear resets alike: they run in the order the
        # page sent them, so a reset sent before a question cannot land after its answer and wipe it.
        events = {"concurrency_limit": 1, "concurrency_id": "model"}
        ask.click(handler(None), inputs, outputs, **events)
        question.submit(handler(None), inputs, outputs, **events)
        for task, button in task_buttons.items():
            button.click(handler(task), inputs, outputs, **events)
        image.change(new_image, [image], [conversation, chatbot, boxes], **events)
        reset.click(clear, [conversation], [conversation, chatbot, boxes], **events)
    demo.queue(max_size=64)
    return demo


def _boxes_update(gr, value, first: bool):
    """The drawing shows the latest answer's boxes, one colour per phrase: emptied when an answer
    starts, drawn when it ends with boxes."""
    if value is None:
        return None if first else gr.skip()
    phrases = list(dict.fromkeys(label for _, label in value[1]))
    colors = {phrase: BOX_COLORS[k % len(BOX_COLORS)] for k, phrase in enumerate(phrases)}
    return gr.AnnotatedImage(value=value, color_map=colors)


def launch_demo(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, **kwargs):
    """``demo.launch`` with what an offline machine needs: system fonts, no server-side rendering
    process, no share link. Returns what ``launch`` returns."""
    import gradio as gr

    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    return demo.launch(server_name=host, server_port=port, theme=theme, ssr_mode=False, share=False, **kwargs)
