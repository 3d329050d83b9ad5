// Drives Colony's dashboard in headless Chromium (Debian's, via
// playwright-core): the overview, a failed task followed from it, signing
// in, rejecting a task in review with a note, a task page updating itself
// as the queue moves, and an agent's injected <script> that must not run.
// host/tests/browser.rs starts the server and the tasks, then runs this
// with: BASE, TOKEN, FAILED_ID, REVIEW_ID, XSS_ID, OUT (screenshots), CHROMIUM.
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const [base, token, failedId, reviewId, xssId, out] =
  ["BASE", "TOKEN", "FAILED_ID", "REVIEW_ID", "XSS_ID", "OUT"].map(env);

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const steps = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const dialogs = [];
  page.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss(); });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));

  // The overview, and a failed task followed from its list of failures.
  await page.goto(`${base}/`);
  check((await page.textContent("h1")) === "Overview", "the overview has its heading");
  check(await page.isVisible("figure.chart svg"), "the overview draws its chart");
  await page.screenshot({ path: `${out}/overview.png`, fullPage: true });
  steps.push("overview");
  await page.click(`ul.failures a[href="/tasks/${failedId}"]`);
  await page.waitForURL(`${base}/tasks/${failedId}`);
  const errorBox = await page.textContent(".error-box");
  check(errorBox.includes("permanent"), `the failed task shows its error kind: ${errorBox}`);
  await page.screenshot({ path: `${out}/task-failed.png`, fullPage: true });
  steps.push("failed task");

  // An agent's result carrying markup shows as text and runs nothing.
  await page.goto(`${base}/tasks/${xssId}`);
  const result = await page.textContent("pre.result");
  check(result.includes("<script>window.__pwned=1</script>"), `the result shows the markup as text: ${result}`);
  check(await page.evaluate(() => window.__pwned === undefined), "the injected script ran");
  check((await page.$$("pre.result script, pre.result img")).length === 0, "the result holds elements");
  steps.push("escaped");

  // Sign in, then reject the task in review with a note: back to ready.
  await page.goto(`${base}/tasks/${reviewId}`);
  await page.click(`main a[href="/login?next=/tasks/${reviewId}"]`);
  await page.fill("input[name=operator]", "browser-test");
  await page.fill("input[name=token]", token);
  await page.click("button[type=submit]");
  await page.waitForURL(`${base}/tasks/${reviewId}`);
  check((await page.textContent("h1 .state")) === "review", "the task waits in review");
  await page.fill("form.review textarea[name=note]", "Make it shorter, please.");
  await page.click("form.review button[value=reject]");
  await page.waitForURL(`${base}/tasks/${reviewId}`);
  check((await page.textContent("h1 .state")) === "ready", "a rejected task returns to ready");
  const fields = await page.textContent("table.fields");
  check(fields.includes("Make it shorter, please."), `the note became the feedback: ${fields}`);
  const events = await page.textContent("table.events");
  check(events.includes("web:browser-test"), `the audit trail names the operator: ${events}`);
  await page.screenshot({ path: `${out}/task-rejected.png`, fullPage: true });
  steps.push("rejected");

  // The page follows the task live: a cancel made elsewhere (the API)
  // shows up without a reload, but not over a reason typed and not sent.
  const marker = await page.evaluate(() => { window.__stayed = true; return true; });
  await page.fill("form.inline input[name=reason]", "a draft");
  await page.evaluate(() => document.activeElement.blur());
  const cancel = await fetch(`${base}/api/tasks/${reviewId}/cancel`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}` },
    body: JSON.stringify({ reason: "cancelled from another window" }),
  });
  check(cancel.status === 200, `the API cancelled the task: ${cancel.status}`);
  await page.waitForTimeout(2500);
  check(await page.inputValue("form.inline input[name=reason]") === "a draft", "a refresh wiped an unsent draft");
  await page.fill("form.inline input[name=reason]", "");
  await page.evaluate(() => document.activeElement.blur());
  await page.waitForFunction(() => document.querySelector("h1 .state")?.textContent === "cancelled", null, { timeout: 15000 });
  check(marker && (await page.evaluate(() => window.__stayed === true)), "the page reloaded instead of updating");
  steps.push("live");

  check(dialogs.length === 0, `dialogs opened: ${dialogs}`);
  check(pageErrors.length === 0, `page errors: ${pageErrors}`);
  console.log(JSON.stringify({ ok: true, steps }));
} catch (e) {
  console.error(`failed after ${JSON.stringify(steps)}: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
