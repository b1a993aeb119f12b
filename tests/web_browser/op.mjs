// A real OpenID provider on loopback for tests/web_browser.rs: the
// `oidc-provider` package with one confidential client (gridgate) and its
// development login form (any password). Accounts are named by the login;
// each gets the e-mail <login>@example.com. Prints `issuer <URL>` once
// listening, and stops when its standard input closes.
//
//   node op.mjs <redirect_uri> <client_secret>
import Provider from "oidc-provider";
import http from "node:http";

const [redirectUri, clientSecret] = process.argv.slice(2);
const server = http.createServer();
server.listen(0, "127.0.0.1", () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: "gridgate",
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      grant_types: ["authorization_code"],
      response_types: ["code"],
      token_endpoint_auth_method: "client_secret_basic",
    }],
    claims: { openid: ["sub"], email: ["email", "email_verified"] },
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() {
          return { sub: id, email: `${id}@example.com`, email_verified: true };
        },
      };
    },
    pkce: { required: () => true },
    // Put the scopes' claims in the ID token, as most providers do.
    conformIdTokenClaims: false,
    ttl: { IdToken: 600 },
    cookies: { keys: ["gridgate-test-op-cookie-key"] },
  });
  provider.on("server_error", (ctx, err) => console.error("op error:", err));
  server.on("request", provider.callback());
  console.log(`issuer ${issuer}`);
});
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
