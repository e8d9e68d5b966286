// The chat page: lists the served models, sends the conversation to /v1/chat/completions with
// stream: true and shows the answer as its server-sent events arrive. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];  // [{role, content}] of this chat

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    const current = select.value;
    select.replaceChildren(...body.data.map((m) => new Option(m.parent ? m.id : m.id + " (base)", m.id)));
    if (current) select.value = current;
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "could not list models: " + e.message;
  }
}

// Reads an SSE body; calls onEvent(parsed JSON) for each `data:` line until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

// The related FAQ questions an answer came with ("did you mean" after a decline): a click asks one.
function relatedNote(choice) {
  const note = document.createElement("div");
  note.className = "related";
  note.append(choice.faqtune_citation ? "related: " : "did you mean: ");
  for (const r of choice.faqtune_related) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = r.question;
    button.addEventListener("click", () => { if (!$("send").disabled) ask(r.question); });
    note.appendChild(button);
  }
  return note;
}

async function ask(question) {
  history.push({ role: "user", content: question });
  addMessage("user", question);
  const bubble = addMessage("assistant", "");
  bubble.dataset.state = "streaming";
  $("send").disabled = true;
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model: $("model").value, messages: history, stream: true }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.index !== 0) continue;
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          bubble.textContent = answer;
        }
        if (choice.faqtune_citation) {
          const c = choice.faqtune_citation;
          const note = document.createElement("div");
          note.className = "citation";
          note.textContent = `source: FAQ #${c.id}: ${c.question}`;
          bubble.appendChild(note);
        }
        if (choice.faqtune_related) bubble.appendChild(relatedNote(choice));
      }
    });
    history.push({ role: "assistant", content: answer });
    bubble.dataset.state = "done";
  } catch (e) {
    bubble.className = "msg error";
    bubble.textContent = "error: " + e.message;
    bubble.dataset.state = "error";
    history.pop();
  } finally {
    $("send").disabled = false;
    $("question").focus();
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || $("send").disabled) return;
  $("question").value = "";
  ask(question);
});
$("reset").addEventListener("click", () => { history = []; $("log").replaceChildren(); });
$("api-key").addEventListener("change", loadModels);
loadModels();
