//! `jetsync top`: a live table of every node that answers (`$SRV` discovery), refreshed
//! every second: connection, checkpoint, lag, outbox, apply and publish rates, conflicts,
//! quarantine, peers refusing its events (REFUSED), its own writes the stream refused for
//! good and parked (PARKED), its SQL mirrors (MIRROR), halts. Drawn with ratatui on crossterm; `--once` renders
//! one frame as plain text and exits (scripts, tests, a terminal-less ssh).
//!
//! A node that stops answering stays, marked MISSING with why: expected are the nodes
//! seen earlier in the session, the lease bucket's holders and those named with
//! `--expect`. Nodes given with `--http` are read from their ops listener's `/status`,
//! so they stay visible while NATS is down; a NATS error is shown, never an empty table.
//! Narrow terminals drop columns (publish rate first) before they cut a node's name.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};
use serde_json::{Value, json};

use super::Conn;
use crate::api::ApiClient;

/// `jetsync top`: a live view of every node answering on the prefix.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Render one frame as text (after two samples, so rates are filled) and exit.
    #[arg(long)]
    pub once: bool,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Columns of the `--once` frame [default: the terminal's, else `COLUMNS`, else 130].
    #[arg(long)]
    pub width: Option<u16>,
    /// Nodes expected to answer (comma separated): shown as missing when they do not.
    /// Nodes seen earlier in the session and the lease bucket's holders are expected too.
    #[arg(long = "expect", value_delimiter = ',')]
    pub expect: Vec<String>,
    /// Nodes' ops listeners (`host:port`, comma separated) to read `/status` from over
    /// HTTP: they stay visible while NATS is down.
    #[arg(long, value_delimiter = ',')]
    pub http: Vec<String>,
    /// Where the nodes are.
    #[command(flatten)]
    pub conn: Conn,
}

/// One node's row: its status now and the rates since the previous sample.
#[derive(Clone, Debug, Default)]
pub struct NodeRow {
    /// The node id (or the HTTP address of a node never read).
    pub node: String,
    /// Its last `status` reply.
    pub status: Option<Value>,
    /// Why its status could not be read.
    pub error: Option<String>,
    /// Events taken from the stream per second since the previous sample (what
    /// `jetsync_applied_events_total` counts: own echoes passed over are not).
    pub apply_rate: Option<f64>,
    /// Events published per second since the previous sample.
    pub publish_rate: Option<f64>,
    /// Expected but not answering (the reason is in `error`).
    pub missing: bool,
    /// Read over HTTP from this address instead of NATS.
    pub via_http: Option<String>,
}

/// One sample: the rows, and notes saying what could not be asked and why.
#[derive(Clone, Debug, Default)]
pub struct Frame {
    /// One row per node, by name.
    pub rows: Vec<NodeRow>,
    /// Whole sentences: NATS errors, why each missing node is missing.
    pub notes: Vec<String>,
}

impl Frame {
    /// `N nodes, M missing`.
    pub fn summary(&self) -> String {
        let missing = self.rows.iter().filter(|r| r.missing).count();
        let n = self.rows.len() - missing;
        let nodes = if n == 1 { "node" } else { "nodes" };
        let mut out = format!("{n} {nodes}");
        if missing > 0 {
            out.push_str(&format!(", {missing} missing"));
        }
        // Whatever columns a narrow terminal drops, these stay in sight.
        let parked = self.rows.iter().filter(|r| parked(r) > 0).count();
        if parked > 0 {
            out.push_str(&format!(", {parked} with parked writes"));
        }
        let mirrors = self
            .rows
            .iter()
            .filter(|r| matches!(mirror_cell(r).as_str(), "broken" | "failing"))
            .count();
        if mirrors > 0 {
            out.push_str(&format!(", {mirrors} with a failing mirror"));
        }
        out
    }
}

/// What top reaches NATS with.
pub struct Nats {
    /// The connection (its state tells an outage apart from an empty deployment).
    pub client: async_nats::Client,
    /// The nodes' API on it.
    pub api: ApiClient,
    /// The stream's name (the lease bucket is named after it).
    pub stream: String,
}

/// Keeps the previous sample per node to turn totals into rates, and which nodes are
/// expected (seen before, holding a lease, named with `--expect`).
#[derive(Default)]
pub struct Sampler {
    previous: HashMap<String, (Instant, u64, u64)>,
    expected: BTreeMap<String, &'static str>,
    http: Vec<String>,
    /// The node each HTTP address answered as, last time.
    http_names: HashMap<String, String>,
}

/// How long one HTTP `/status` read may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

impl Sampler {
    /// A sampler expecting `expect` and reading `http` addresses over HTTP.
    pub fn new(expect: Vec<String>, http: Vec<String>) -> Self {
        Sampler {
            expected: expect
                .into_iter()
                .map(|n| (n, "named with --expect"))
                .collect(),
            http,
            ..Sampler::default()
        }
    }

    /// Discovers the nodes and asks each for its status (over NATS when `nats` is
    /// connected, over HTTP for the `--http` addresses), and marks expected nodes that did
    /// not answer as missing. `nats_down` says why there is no NATS connection.
    pub async fn sample(&mut self, nats: Option<&Nats>, nats_down: Option<String>) -> Frame {
        let mut frame = Frame::default();
        let mut rows: BTreeMap<String, NodeRow> = BTreeMap::new();
        // Why an expected node can be missing: discovery failed, or it did not answer.
        let mut nats_error = nats_down;
        if let Some(n) = nats {
            let state = n.client.connection_state();
            if state != async_nats::connection::State::Connected {
                nats_error = Some(format!("NATS connection {state}"));
            }
        }
        if let (Some(n), None) = (nats, &nats_error) {
            match n.api.nodes(Duration::from_millis(500)).await {
                Ok(nodes) => {
                    let names: Vec<String> = nodes
                        .iter()
                        .filter_map(|x| x["node"].as_str().map(str::to_owned))
                        .collect();
                    let replies = futures::future::join_all(names.iter().map(|name| async move {
                        (name.clone(), n.api.call(name, "status", json!({})).await)
                    }))
                    .await;
                    for (node, reply) in replies {
                        let mut row = NodeRow {
                            node: node.clone(),
                            ..NodeRow::default()
                        };
                        match reply {
                            Ok(s) => row.status = Some(s),
                            Err(e) => row.error = Some(e.to_string()),
                        }
                        rows.insert(node, row);
                    }
                }
                Err(e) => nats_error = Some(format!("discovery failed: {e}")),
            }
            let js = async_nats::jetstream::new(n.client.clone());
            let holders = tokio::time::timeout(
                Duration::from_secs(1),
                crate::lease::holders(&js, &n.stream),
            )
            .await;
            if let Ok(Ok(holders)) = holders {
                // A node stopped cleanly released its key: not expected any more.
                let silent: Vec<String> = holders
                    .iter()
                    .filter(|h| !rows.contains_key(*h))
                    .cloned()
                    .collect();
                let released = tokio::time::timeout(
                    Duration::from_secs(1),
                    crate::lease::released(&js, &n.stream, &silent),
                )
                .await
                .unwrap_or_default();
                for h in holders {
                    if !released.contains(&h) {
                        self.expected.entry(h).or_insert("holds a node lease");
                    } else if self.expected.get(&h) == Some(&"holds a node lease") {
                        self.expected.remove(&h);
                    }
                }
            }
        }
        if let Some(e) = &nats_error {
            frame.notes.push(if self.http.is_empty() {
                format!("NATS: {e}; no node can be asked (give --http host:port,... to read nodes' /status over HTTP)")
            } else {
                format!("NATS: {e}; showing the nodes read over HTTP (--http)")
            });
        }
        for (node, addr, e) in self.sample_http(&mut rows).await {
            frame
                .notes
                .push(format!("missing: {node} (--http {addr}): {e}"));
        }
        let now = Instant::now();
        for row in rows.values_mut() {
            let Some(s) = &row.status else { continue };
            let checkpoint = s["checkpoint"].as_u64().unwrap_or(0);
            // Older nodes have no applied_events: their checkpoint moves with own echoes.
            let taken = s["applied_events"].as_u64().unwrap_or(checkpoint);
            let published = s["published"].as_u64().unwrap_or(0);
            if let Some((t, c, p)) = self.previous.get(&row.node) {
                let secs = now.duration_since(*t).as_secs_f64().max(1e-3);
                row.apply_rate = Some(taken.saturating_sub(*c) as f64 / secs);
                row.publish_rate = Some(published.saturating_sub(*p) as f64 / secs);
            }
            self.previous
                .insert(row.node.clone(), (now, taken, published));
        }
        for (node, why) in &self.expected {
            if rows.contains_key(node) {
                continue;
            }
            let cause = match &nats_error {
                Some(_) => "NATS unreachable and not read over HTTP",
                None => {
                    "no reply to $SRV discovery (stopped, frozen, cut off, or in another NATS account)"
                }
            };
            frame
                .notes
                .push(format!("missing: {node} ({why}): {cause}"));
            rows.insert(
                node.clone(),
                NodeRow {
                    node: node.clone(),
                    error: Some(format!("{why}; {cause}")),
                    missing: true,
                    ..NodeRow::default()
                },
            );
        }
        for row in rows.values() {
            if row.status.is_some() {
                self.expected.insert(row.node.clone(), "seen earlier");
            }
            let n = parked(row);
            if n > 0 {
                let why = row
                    .status
                    .as_ref()
                    .and_then(|s| s["publish_refused"].as_str());
                frame.notes.push(format!(
                    "parked: {}: {n} own write(s) the stream refused for good, they never leave{} (`jetsync inspect refused --node {}`)",
                    row.node,
                    why.map(|w| format!("; last: {w}")).unwrap_or_default(),
                    row.node
                ));
            }
            for m in row
                .status
                .as_ref()
                .and_then(|s| s["mirrors"].as_array())
                .into_iter()
                .flatten()
                .filter(|m| !m["error"].is_null())
            {
                frame.notes.push(format!(
                    "mirror: {} {}: {} for {:.0} s{}",
                    row.node,
                    num(&m["name"]),
                    num(&m["error"]),
                    m["failing_seconds"].as_f64().unwrap_or(0.0),
                    if m["broken"].as_bool() == Some(true) {
                        " (broken: the node is not ready)"
                    } else {
                        ""
                    }
                ));
            }
        }
        frame.rows = rows.into_values().collect();
        frame
    }

    /// Reads `/status` from every `--http` address into `rows` (a node NATS answered for
    /// keeps that row); returns the nodes it could not read, with their address and why.
    async fn sample_http(
        &mut self,
        rows: &mut BTreeMap<String, NodeRow>,
    ) -> Vec<(String, String, String)> {
        let mut failed = Vec::new();
        let reads = futures::future::join_all(self.http.iter().map(|addr| {
            let addr = addr.clone();
            async move {
                let got = tokio::task::spawn_blocking({
                    let addr = addr.clone();
                    move || http_status(&addr)
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                (addr, got)
            }
        }))
        .await;
        for (addr, got) in reads {
            match got {
                Ok(status) => {
                    let node = status["node"].as_str().unwrap_or(&addr).to_owned();
                    self.http_names.insert(addr.clone(), node.clone());
                    if rows.get(&node).is_some_and(|r| r.status.is_some()) {
                        continue;
                    }
                    rows.insert(
                        node.clone(),
                        NodeRow {
                            node,
                            status: Some(status),
                            via_http: Some(addr),
                            ..NodeRow::default()
                        },
                    );
                }
                Err(e) => {
                    let node = self.http_names.get(&addr).cloned().unwrap_or(addr.clone());
                    if rows.get(&node).is_some_and(|r| r.status.is_some()) {
                        continue;
                    }
                    rows.insert(
                        node.clone(),
                        NodeRow {
                            node: node.clone(),
                            error: Some(format!("http {addr}: {e}")),
                            missing: true,
                            via_http: Some(addr.clone()),
                            ..NodeRow::default()
                        },
                    );
                    failed.push((node, addr, e));
                }
            }
        }
        failed
    }
}

/// One node's status over HTTP (`GET /status` on its ops listener).
fn http_status(addr: &str) -> Result<Value, String> {
    use std::net::ToSocketAddrs;
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    match super::health::get(sock, "/status", HTTP_TIMEOUT) {
        Ok((200, body)) => serde_json::from_str(&body).map_err(|e| format!("/status: {e}")),
        Ok((404, _)) => Err("no /status (a node older than this jetsync)".into()),
        Ok((code, body)) => Err(format!("/status: {code} {}", body.trim())),
        Err(e) => Err(e.to_string()),
    }
}

fn num(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.0}/s"))
}

/// The columns of the table. REFUSED: peers holding this node's events in quarantine;
/// PARKED: this node's own writes the stream refused for good (`status.refused`, listed
/// by `jetsync quarantine`), which never leave; MIRROR: its SQL mirrors, the worst of
/// them (`ok`, the oldest unwritten change's age, `failing`, `broken`; `-`: none).
pub const HEADERS: [&str; 14] = [
    "NODE",
    "NATS",
    "CHECKPOINT",
    "LAG",
    "LAG S",
    "OUTBOX",
    "APPLY",
    "PUBLISH",
    "CONFLICTS",
    "QUARANT",
    "REFUSED",
    "PARKED",
    "MIRROR",
    "HALTED",
];

/// Each column's width (the node's is computed, the last takes what is left).
const WIDTHS: [u16; 14] = [0, 12, 10, 8, 7, 7, 9, 9, 9, 7, 7, 6, 8, 8];

/// Columns dropped first when the terminal is narrow: names stay whole, and the node,
/// its connection, its lag, its parked writes and whether it is halted stay longest
/// (the footer counts nodes with parked writes or a failing mirror whatever is shown).
const DROP_ORDER: [usize; 10] = [7, 2, 4, 8, 12, 10, 6, 9, 5, 11];

/// Which columns fit in `width` and how wide each is, for these rows.
fn layout(rows: &[NodeRow], width: u16) -> Vec<(usize, u16)> {
    let longest = rows
        .iter()
        .map(|r| r.node.chars().count())
        .max()
        .unwrap_or(0)
        .max(HEADERS[0].len());
    let node_w = u16::try_from(longest).unwrap_or(u16::MAX);
    let mut cols: Vec<usize> = (0..HEADERS.len()).collect();
    // Borders (2) and one space between columns.
    let need = |cols: &[usize]| -> u32 {
        2 + cols
            .iter()
            .map(|&c| u32::from(if c == 0 { node_w } else { WIDTHS[c] }))
            .sum::<u32>()
            + u32::try_from(cols.len().saturating_sub(1)).unwrap_or(0)
    };
    for drop in DROP_ORDER {
        if need(&cols) <= u32::from(width) {
            break;
        }
        cols.retain(|&c| c != drop);
    }
    // Still too narrow: the name gets what is left.
    let fixed: u32 = need(&cols) - u32::from(node_w);
    let node_w = node_w.min(
        u16::try_from(u32::from(width).saturating_sub(fixed))
            .unwrap_or(0)
            .max(4),
    );
    cols.into_iter()
        .map(|c| (c, if c == 0 { node_w } else { WIDTHS[c] }))
        .collect()
}

/// The cells of one row, as text.
pub fn cells(row: &NodeRow) -> Vec<String> {
    let Some(s) = &row.status else {
        let state = if row.missing { "MISSING" } else { "?" };
        let mut v = vec![row.node.clone(), state.into()];
        v.extend(std::iter::repeat_n("-".to_owned(), HEADERS.len() - 3));
        v.push(row.error.clone().unwrap_or_default());
        return v;
    };
    let lag_secs = s["lag_seconds"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_f64).fold(0.0, f64::max))
        .map_or_else(|| "-".into(), |x| format!("{x:.1}"));
    let refused: u64 = s["refused_by"]
        .as_object()
        .map(|m| {
            m.values()
                .flat_map(|r| r.as_object().into_iter().flat_map(|o| o.values()))
                .filter_map(Value::as_u64)
                .sum()
        })
        .unwrap_or(0);
    vec![
        row.node.clone(),
        // An edge site node cut off from its hub (connected to its own site's server).
        match s["site_link"]["up"].as_bool() {
            Some(false) if s["connection"] == "connected" => "hub cut".to_owned(),
            _ => num(&s["connection"]),
        },
        num(&s["checkpoint"]),
        num(&s["lag"]),
        lag_secs,
        num(&s["outbox"]),
        rate(row.apply_rate),
        rate(row.publish_rate),
        num(&s["conflicts"]),
        num(&s["quarantined"]),
        refused.to_string(),
        parked(row).to_string(),
        mirror_cell(row),
        s["halted"]["kind"].as_str().unwrap_or("no").to_owned(),
    ]
}

/// This node's own writes parked in `refused` (the stream refused them for good).
fn parked(row: &NodeRow) -> u64 {
    row.status
        .as_ref()
        .and_then(|s| s["refused"].as_u64())
        .unwrap_or(0)
}

/// The worst of a node's SQL mirrors: `broken` (failing past its bound, the node is not
/// ready), `failing`, the age of the oldest change not written yet, `ok`; `-` for none.
fn mirror_cell(row: &NodeRow) -> String {
    let Some(mirrors) = row
        .status
        .as_ref()
        .and_then(|s| s["mirrors"].as_array())
        .filter(|m| !m.is_empty())
    else {
        return "-".into();
    };
    if mirrors.iter().any(|m| m["broken"].as_bool() == Some(true)) {
        return "broken".into();
    }
    if mirrors.iter().any(|m| !m["error"].is_null()) {
        return "failing".into();
    }
    let behind = mirrors
        .iter()
        .filter_map(|m| m["behind"].as_u64())
        .sum::<u64>();
    let lag = mirrors
        .iter()
        .filter_map(|m| m["lag_seconds"].as_f64())
        .fold(0.0, f64::max);
    if behind == 0 {
        "ok".into()
    } else {
        format!("{lag:.1}s")
    }
}

fn draw(frame: &mut ratatui::Frame<'_>, rows: &[NodeRow], footer: &str) {
    let [table_area, footer_area] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(frame.area());
    let cols = layout(rows, table_area.width);
    let last = cols.len().saturating_sub(1);
    let header = Row::new(cols.iter().map(|(c, _)| Cell::from(HEADERS[*c])))
        .style(Style::default().add_modifier(Modifier::BOLD));
    let body = rows.iter().map(|r| {
        let c = cells(r);
        let bad = r
            .status
            .as_ref()
            .is_none_or(|s| !s["halted"].is_null() || s["connection"] != "connected");
        let style = if bad {
            Style::default().fg(Color::Red)
        } else {
            Style::default()
        };
        Row::new(cols.iter().map(|(i, _)| Cell::from(c[*i].clone()))).style(style)
    });
    let widths: Vec<Constraint> = cols
        .iter()
        .enumerate()
        .map(|(i, (_, w))| {
            if i == last {
                Constraint::Min(*w)
            } else {
                Constraint::Length(*w)
            }
        })
        .collect();
    let table = Table::new(body, widths)
        .header(header)
        .block(Block::bordered().title(" jetsync top "));
    frame.render_widget(table, table_area);
    frame.render_widget(Paragraph::new(Line::from(footer.to_owned())), footer_area);
}

/// One frame as plain text, `width` columns wide, its notes (missing nodes, NATS errors)
/// in full below it.
pub fn render_text(frame: &Frame, width: u16) -> String {
    let rows = &frame.rows;
    let height = u16::try_from(rows.len())
        .unwrap_or(u16::MAX)
        .saturating_add(4);
    let Ok(mut term) = Terminal::new(TestBackend::new(width, height));
    let _ = term.draw(|f| draw(f, rows, &frame.summary()));
    let buffer = term.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..buffer.area.height {
        let mut line = String::new();
        for x in 0..buffer.area.width {
            line.push_str(buffer[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for r in rows.iter().filter(|r| r.via_http.is_some() && !r.missing) {
        out.push_str(&format!(
            "{}: read over HTTP from {}\n",
            r.node,
            r.via_http.as_deref().unwrap_or("?")
        ));
    }
    for note in &frame.notes {
        out.push_str(note);
        out.push('\n');
    }
    out
}

/// The `--once` frame's width: the flag, the terminal's, `COLUMNS`, or 130.
fn text_width(flag: Option<u16>) -> u16 {
    use std::io::IsTerminal;
    if let Some(w) = flag {
        return w.max(20);
    }
    if std::io::stdout().is_terminal()
        && let Ok((w, _)) = ratatui::crossterm::terminal::size()
    {
        return w.max(20);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<u16>().ok())
        .map_or(130, |w| w.max(20))
}

/// Connects to NATS for top: `Err` says why not (top goes on with the HTTP nodes).
async fn connect(conn: &Conn) -> Result<Nats, String> {
    let client = conn.nats().await.map_err(|e| format!("{e:#}"))?;
    Ok(Nats {
        // A silent node must not hold the frame for the default 5 s.
        api: ApiClient::new(client.clone(), &conn.prefix)
            .with_stream(&conn.stream)
            .with_timeout(Duration::from_secs(2)),
        client,
        stream: conn.stream.clone(),
    })
}

/// Runs `jetsync top` until interrupted (or for one frame with `--once`).
pub async fn run(args: TopArgs) -> anyhow::Result<std::process::ExitCode> {
    let mut nats = connect(&args.conn).await;
    if let Err(e) = &nats
        && args.http.is_empty()
    {
        anyhow::bail!(
            "{e}\n(top reads nodes over NATS; give --http host:port,... to read nodes' /status over HTTP while NATS is down)"
        );
    }
    let interval = Duration::from_secs_f64(args.interval.max(0.1));
    let mut sampler = Sampler::new(args.expect.clone(), args.http.clone());
    if args.once {
        let down = nats.as_ref().err().cloned();
        sampler.sample(nats.as_ref().ok(), down.clone()).await;
        tokio::time::sleep(interval).await;
        let frame = sampler.sample(nats.as_ref().ok(), down).await;
        print!("{}", render_text(&frame, text_width(args.width)));
        let shown = frame.rows.iter().any(|r| r.status.is_some());
        return Ok(if nats.is_err() && !shown {
            std::process::ExitCode::FAILURE
        } else {
            std::process::ExitCode::SUCCESS
        });
    }
    interactive(&args.conn, &mut nats, &mut sampler, interval).await?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn interactive(
    conn: &Conn,
    nats: &mut Result<Nats, String>,
    sampler: &mut Sampler,
    interval: Duration,
) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    use ratatui::crossterm::terminal;
    use ratatui::crossterm::{ExecutableCommand, cursor};

    let mut stdout = std::io::stdout();
    terminal::enable_raw_mode().context("the terminal does not support raw mode (try --once)")?;
    stdout.execute(terminal::EnterAlternateScreen)?;
    let backend = ratatui::backend::CrosstermBackend::new(std::io::stdout());
    let mut term = Terminal::new(backend)?;
    // Restores the terminal on every way out, errors included.
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = terminal::disable_raw_mode();
            let mut out = std::io::stdout();
            let _ = out.execute(terminal::LeaveAlternateScreen);
            let _ = out.execute(cursor::Show);
            let _ = out.flush();
        }
    }
    let _restore = Restore;
    loop {
        if nats.is_err() {
            // NATS was down at start: try again each round (fails fast).
            *nats = connect(conn).await;
        }
        let down = nats.as_ref().err().cloned();
        let frame = sampler.sample(nats.as_ref().ok(), down).await;
        let mut footer = frame.summary();
        if let Some(note) = frame.notes.first() {
            footer.push_str(" · ");
            footer.push_str(note);
        }
        footer.push_str(" · q quits");
        term.draw(|f| draw(f, &frame.rows, &footer))?;
        let deadline = Instant::now() + interval;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            // crossterm's poll blocks: keep it off the async workers.
            let key = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Event>> {
                if event::poll(left)? {
                    event::read().map(Some)
                } else {
                    Ok(None)
                }
            })
            .await??;
            if let Some(Event::Key(k)) = key {
                let ctrl_c =
                    k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || k.code == KeyCode::Char('q') || k.code == KeyCode::Esc {
                    return Ok(());
                }
            }
            if let Some(Event::Resize(..)) = key {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(node: &str, missing: bool) -> NodeRow {
        NodeRow {
            node: node.into(),
            status: (!missing).then(|| {
                json!({"connection": "connected", "checkpoint": 123456, "lag": 0,
                       "outbox": 0, "conflicts": 0, "quarantined": 0, "halted": null})
            }),
            error: missing.then(|| "holds a node lease; no reply".to_owned()),
            missing,
            ..NodeRow::default()
        }
    }

    /// At 80 columns every name is whole and no line is wider; columns go instead, the
    /// publish rate first; at 130 all are there.
    #[test]
    fn narrow_frames_drop_columns_before_names() {
        let frame = Frame {
            rows: vec![
                row("berlin-frankfurt-1", false),
                row("lisbon-porto-2", true),
            ],
            notes: vec![],
        };
        let text = render_text(&frame, 80);
        for l in text.lines() {
            assert!(l.chars().count() <= 80, "{l:?}\n{text}");
        }
        assert!(text.contains("│berlin-frankfurt-1 "), "{text}");
        assert!(text.contains("│lisbon-porto-2 "), "{text}");
        assert!(text.contains("MISSING"), "{text}");
        assert!(!text.contains("PUBLISH"), "{text}");
        assert!(text.contains("LAG"), "{text}");
        assert!(text.contains("1 node, 1 missing"), "{text}");
        let wide = render_text(&frame, 160);
        for h in HEADERS {
            assert!(wide.contains(h), "{h} missing at 160 columns:\n{wide}");
        }
    }

    #[test]
    fn parked_writes_and_mirrors_have_cells_and_a_footer() {
        let mut r = row("a", false);
        assert_eq!((parked(&r), mirror_cell(&r)), (0, "-".to_owned()));
        let s = r.status.as_mut().unwrap();
        s["refused"] = json!(2);
        s["mirrors"] = json!([
            {"name": "m1", "behind": 0, "lag_seconds": 0.0, "error": null, "broken": false},
            {"name": "m2", "behind": 5, "lag_seconds": 3.25, "error": null, "broken": false}
        ]);
        assert_eq!((parked(&r), mirror_cell(&r)), (2, "3.2s".to_owned()));
        r.status.as_mut().unwrap()["mirrors"][0]["error"] = json!("connection refused");
        assert_eq!(mirror_cell(&r), "failing");
        r.status.as_mut().unwrap()["mirrors"][0]["broken"] = json!(true);
        assert_eq!(mirror_cell(&r), "broken");
        let frame = Frame {
            rows: vec![r.clone(), row("b", false)],
            notes: vec![],
        };
        assert_eq!(
            frame.summary(),
            "2 nodes, 1 with parked writes, 1 with a failing mirror"
        );
        let c = cells(&r);
        assert_eq!(c.len(), HEADERS.len());
        assert_eq!(c[11], "2");
        assert_eq!(c[12], "broken");
    }
}
