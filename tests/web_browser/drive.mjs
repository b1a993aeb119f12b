// Drives Debian's Chromium with playwright-core for tests/web_browser.rs:
// reads a JSON plan on argv[2], runs it, prints one JSON line of what it saw.
import { chromium } from "playwright-core";

const plan = JSON.parse(process.argv[2]);
const out = { steps: {} };
// Each viewer gets a browser of their own with a fresh profile
// (playwright passes it to Chromium as --user-data-dir).
function browser(profile) {
  return chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 900 },
  });
}

async function signIn(context, page, url, login) {
  const first = await page.goto(url);
  const seen = { status: first.status(), signInShown: await page.locator("#sign-in").count() > 0 };
  await page.click("#sign-in");
  // oidc-provider's development login form, then its consent form.
  await page.waitForSelector("input[name=login]");
  await page.fill("input[name=login]", login);
  await page.fill("input[name=password]", "any");
  await page.click("button[type=submit]");
  await page.waitForLoadState();
  for (let i = 0; i < 3 && !page.url().startsWith(plan.base); i++) {
    const button = page.locator("button[type=submit]");
    if (await button.count() === 0) break;
    await button.first().click();
    await page.waitForLoadState();
  }
  await page.waitForURL((u) => u.toString().startsWith(plan.base));
  seen.backAt = page.url();
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "gridgate_session");
  seen.cookie = session ? { httpOnly: session.httpOnly, secure: session.secure, sameSite: session.sameSite, expires: session.expires } : null;
  return seen;
}

const open = [];
let current = null;
try {
  const context = await browser(`${plan.profile}-alice`);
  open.push(context);
  const page = context.pages()[0] || await context.newPage();
  current = page;
  const csp = [];
  page.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) csp.push(m.text()); });

  // alice signs in from the link Bazel printed and sees her build.
  out.steps.alice = await signIn(context, page, plan.invocation, "alice");
  const res = await page.reload();
  out.steps.invocation = {
    status: res.status(),
    state: (await page.textContent("#state")).trim(),
    problems: await page.$$eval("#problems details summary .label", (e) => e.map((x) => x.textContent)),
    problemStatus: await page.$$eval("#problems details summary .badge", (e) => e.map((x) => x.textContent)),
    firstLog: await page.$eval("#problems details pre.log", (e) => e.textContent).catch(() => ""),
    tests: await page.$$eval("#tests tbody tr td.label", (e) => e.map((x) => x.textContent)),
    console: await page.$eval("#console pre", (e) => e.textContent.length),
  };
  await page.screenshot({ path: `${plan.shots}/invocation.png` });

  // The target filter (a GET form).
  await page.selectOption("#targets select[name=status]", "failed");
  await Promise.all([page.waitForLoadState(), page.click("#targets button[type=submit]")]);
  out.steps.targetFilter = await page.$$eval("#targets tbody tr td.label", (e) => e.map((x) => x.textContent));

  // Bazel 4.2.3's build of the same workspace, when the test ran it.
  if (plan.invocation4) {
    const r4 = await page.goto(plan.invocation4);
    out.steps.invocation4 = {
      status: r4.status(),
      state: (await page.textContent("#state")).trim(),
      problems: await page.$$eval("#problems details summary .label", (e) => e.map((x) => x.textContent)),
      problemStatus: await page.$$eval("#problems details summary .badge", (e) => e.map((x) => x.textContent)),
      firstLog: await page.$eval("#problems details pre.log", (e) => e.textContent).catch(() => ""),
    };
  }

  // The list shows the build; its filters narrow it.
  await page.goto(`${plan.base}/invocations`);
  const rows = () => page.$$eval("#invocations tbody tr td a", (e) => e.map((x) => x.getAttribute("href"))).catch(() => []);
  out.steps.list = await rows();
  await page.screenshot({ path: `${plan.shots}/list.png` });
  await page.selectOption("form.filter select[name=state]", "failed");
  await page.fill("form.filter input[name=command]", "test");
  await Promise.all([page.waitForLoadState(), page.click("form.filter button[type=submit]")]);
  out.steps.listFailed = await rows();
  await page.selectOption("form.filter select[name=state]", "succeeded");
  await Promise.all([page.waitForLoadState(), page.click("form.filter button[type=submit]")]);
  out.steps.listSucceeded = await rows();

  // Sign out (a POST with the session's token) ends the session.
  await Promise.all([page.waitForLoadState(), page.click("form.inline button[type=submit]")]);
  out.steps.afterSignOut = (await context.cookies()).filter((c) => c.name === "gridgate_session").length;
  out.csp = csp;

  // mallory (another team's e-mail) signs in and is refused.
  const other = await browser(`${plan.profile}-mallory`);
  open.push(other);
  const p2 = other.pages()[0] || await other.newPage();
  current = p2;
  out.steps.mallory = await signIn(other, p2, plan.invocation, "mallory");
  const r2 = await p2.reload();
  out.steps.mallory.status = r2.status();
  out.steps.mallory.reason = await p2.textContent("#reason").catch(() => "");
} catch (e) {
  out.error = String(e && e.stack || e);
  if (current) {
    out.url = current.url();
    out.text = await current.innerText("body").catch(() => "");
  }
} finally {
  for (const c of open) { await c.close().catch(() => {}); }
}
console.log(JSON.stringify(out));
