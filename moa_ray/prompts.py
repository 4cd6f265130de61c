"""Every prompt moa-ray sends, in one place, with the papers' exact text where one exists."""

from __future__ import annotations

from moa_ray.chat import ChatMessage, ToolDefinition

#: MoA aggregate-and-synthesize system prompt (Wang et al. 2024, Table 1), verbatim.
AGGREGATE_AND_SYNTHESIZE = (
    "You have been provided with a set of responses from various open-source models to the latest user query. "
    "Your task is to synthesize these responses into a single, high-quality response. It is crucial to critically "
    "evaluate the information provided in these responses, recognizing that some of it may be biased or incorrect. "
    "Your response should not simply replicate the given answers but should offer a refined, accurate, and "
    "comprehensive reply to the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n\nResponses from models:"
)


def aggregate_system_prompt(references: list[str]) -> str:
    """The system prompt that carries the numbered references: ``\\n1. <ref>``, ``\\n2. <ref>``..."""
    return AGGREGATE_AND_SYNTHESIZE + "".join(f"\n{i}. {ref}" for i, ref in enumerate(references, start=1))


def merge_system(messages: list[ChatMessage], system: str) -> list[ChatMessage]:
    """Append ``system`` to an existing leading system message after a blank line, or prepend a new one."""
    if messages and messages[0].role == "system":
        first = ChatMessage(role="system", content=messages[0].content + "\n\n" + system)
        return [first, *messages[1:]]
    return [ChatMessage(role="system", content=system), *messages]


def inject_references(messages: list[ChatMessage], references: list[str], *, tools: bool = False) -> list[ChatMessage]:
    """Inject the previous layer's responses as the paper does (reference code ``inject_references_to_messages``);
    ``tools``: the call that reads them may call tools (the aggregator of a request with tools)."""
    if not references:
        return list(messages)
    return merge_system(messages, aggregate_system_prompt(references) + (AGGREGATE_WITH_TOOLS if tools else ""))


# --------------------------------------------------------------------------- tools: proposers advise, the aggregator acts

#: After the references, for an aggregator that has tools: the proposers could not call them.
AGGREGATE_WITH_TOOLS = (
    "\n\nThe responses above come from advisors who cannot call tools. You can: call the tools available to you "
    "when the request needs them, or answer directly."
)
#: For proposers of a request with tools: they see the tools' names and purposes, never their schemas.
ADVISE_ON_TOOLS = (
    "You are advising an assistant that can call these tools:\n{tools}\nYou cannot call them yourself. Answer the "
    "request as well as you can; where a tool is needed, say which one to call and with what arguments."
)


def _tool_line(tool: ToolDefinition) -> str:
    description = (tool.function.description or "").strip()
    return f"- {tool.function.name}" + (f": {description}" if description else "")


def advisory_messages(messages: list[ChatMessage], tools: list[ToolDefinition] | None) -> list[ChatMessage]:
    """The conversation as proposers see it: text only.

    An assistant turn's tool calls are written out in its text, a tool's result becomes a user turn that says
    which call it answers (turns of one role in a row are joined, as chat templates expect them to alternate),
    and with ``tools`` a system note names the tools the answering model can call. A conversation of plain text
    turns without tools comes back as it is.
    """
    names: dict[str, str] = {}
    out: list[ChatMessage] = []
    last_was_tool = False
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            lines = [message.content] if message.content else []
            for call in message.tool_calls:
                names[call.id] = call.function.name
                lines.append(f"[called the tool {call.function.name} with {call.function.arguments or '{}'}]")
            turn = ChatMessage(role="assistant", content="\n".join(lines))
        elif message.role == "tool":
            name = names.get(message.tool_call_id or "", "a tool")
            turn = ChatMessage(role="user", content=f"[result of {name}]\n{message.content}")
        else:
            turn = message
        if out and out[-1].role == turn.role == "user" and (last_was_tool or message.role == "tool"):
            out[-1] = ChatMessage(role="user", content=out[-1].content + "\n\n" + turn.content)
        else:
            out.append(turn)
        last_was_tool = message.role == "tool"
    if tools:
        out = merge_system(out, ADVISE_ON_TOOLS.format(tools="\n".join(_tool_line(t) for t in tools)))
    return out


def with_role(messages: list[ChatMessage], system: str | None) -> list[ChatMessage]:
    """Give a proposer its own system role, placed before any system text of the conversation."""
    if not system:
        return list(messages)
    if messages and messages[0].role == "system":
        return [ChatMessage(role="system", content=system + "\n\n" + messages[0].content), *messages[1:]]
    return [ChatMessage(role="system", content=system), *messages]


# --------------------------------------------------------------------------- SMoA, ranker, roles
# SMoA (Li et al. 2024): the judge keeps the best k responses and the moderator decides by their
# consistency whether to end the debate, by default in one call. Output is requested as JSON with
# the paper's fields (reasoning, chosen responses, end debate); moa_ray.pipeline.selection also parses
# the paper's markdown-ish form. Response numbers shown to models are 1-based.


def render_question(messages: list[ChatMessage]) -> str:
    """The question a judge sees: the lone user message, or the whole conversation as a transcript."""
    turns = [m for m in messages if m.role != "system"]
    if len(turns) == 1 and turns[0].role == "user" and len(messages) == 1:
        return turns[0].content
    return "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in messages)


def numbered_responses(responses: list[str]) -> str:
    """``Response 1:`` ... blocks, numbered from 1."""
    return "\n\n".join(f"Response {i}:\n{text.strip()}" for i, text in enumerate(responses, start=1))


_JUDGE_TASK = (
    "Choose the {k} best responses by correctness, fluency, relevance and overall quality. Evaluate critically: some "
    "may be biased or incorrect."
)
_MODERATOR_TASK = (
    "Decide whether to end the debate by the consistency of the responses: end it if they agree, so that another "
    "round would not change the answer; continue it if they disagree."
)
#: Longest ``reasoning`` a judge or moderator may write: the paper's field, kept to one sentence because every
#: judge call is pure overhead on top of the proposers (llama.cpp and vLLM enforce it through the JSON schema).
REASONING_MAX_CHARS = 200


def _verdict_prompt(role: str, question: str, responses: list[str], tasks: list[str], keys: list[str]) -> str:
    """Question, numbered responses, the tasks, then the JSON keys to reply with (the judge and moderator shape)."""
    keys = ['"reasoning" (one short sentence)', *keys]
    return (
        f"Question:\n{question}\n\n{numbered_responses(responses)}\n\n"
        f"You are {role} of a discussion between assistants, who gave the {len(responses)} responses above. "
        + " ".join(tasks)
        + f"\n\nReply with a JSON object only, with the keys {', '.join(keys[:-1])} and {keys[-1]}."
    )


def judge_prompt(question: str, responses: list[str], k: int, *, moderate: bool) -> str:
    """The SMoA judge (and, with ``moderate``, moderator) instruction as one user message."""
    tasks = [_JUDGE_TASK.format(k=k)]
    keys = [f'"chosen_responses" (a list of {k} response numbers from 1 to {len(responses)})']
    if moderate:
        tasks.append(_MODERATOR_TASK)
        keys.append('"end_debate" (true or false)')
    role = "the judge and the moderator" if moderate else "the judge"
    return _verdict_prompt(role, question, responses, tasks, keys)


def moderator_prompt(question: str, responses: list[str]) -> str:
    """The SMoA moderator as a separate call: only the end-the-debate decision."""
    return _verdict_prompt("the moderator", question, responses, [_MODERATOR_TASK], ['"end_debate" (true or false)'])


def ranker_prompt(question: str, responses: list[str]) -> str:
    """The LLM-ranker baseline (MoA paper ablation): pick one response verbatim instead of synthesising."""
    task = (
        "Choose the single best response by correctness, fluency, relevance and overall quality. Evaluate "
        "critically: some may be biased or incorrect."
    )
    key = f'"best_response" (the number of the best response, from 1 to {len(responses)})'
    return _verdict_prompt("the ranker", question, responses, [task], [key])


def roles_prompt(dataset: str, task: str, n: int) -> str:
    """SMoA role-playing: one call assigns ``n`` distinct roles suited to a dataset and task."""
    return (
        f"{n} assistants will each answer questions from a dataset, and the best answers will be combined.\n\n"
        f"Dataset description:\n{dataset}\n\nTask description:\n{task}\n\n"
        f"Assign {n} different roles to the assistants, each suited to this task and different from the others, "
        "so that together they cover diverse expertise and viewpoints. Describe each role by an occupation, a "
        "personality and a social group.\n\n"
        f'Reply with a JSON object only, with the key "roles": a list of exactly {n} objects, each with the keys '
        '"occupation", "personality" and "social_group".'
    )


def role_system(role: str) -> str:
    """The system message that gives a proposer its role."""
    return f"Your role: {role}. Answer the user's request from the perspective and with the expertise of this role."
