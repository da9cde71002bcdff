//! `jetsync top`: a live table of every node that answers (`$SRV` discovery), refreshed
//! every second: connection, checkpoint, lag, outbox, apply and publish rates, conflicts,
//! quarantine, refused events, halts. Drawn with ratatui on crossterm; `--once` renders
//! one frame as plain text and exits (scripts, tests, a terminal-less ssh).

use std::collections::HashMap;
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
    /// Where the nodes are.
    #[command(flatten)]
    pub conn: Conn,
}

/// One node's row: its status now and the rates since the previous sample.
#[derive(Clone, Debug, Default)]
pub struct NodeRow {
    /// The node id.
    pub node: String,
    /// Its last `status` reply.
    pub status: Option<Value>,
    /// Why its status could not be read.
    pub error: Option<String>,
    /// Events applied per second since the previous sample.
    pub apply_rate: Option<f64>,
    /// Events published per second since the previous sample.
    pub publish_rate: Option<f64>,
}

/// Keeps the previous sample per node to turn totals into rates.
#[derive(Default)]
pub struct Sampler {
    previous: HashMap<String, (Instant, u64, u64)>,
}

impl Sampler {
    /// Discovers the nodes and asks each for its status.
    pub async fn sample(&mut self, api: &ApiClient) -> anyhow::Result<Vec<NodeRow>> {
        let nodes = api.nodes(Duration::from_millis(500)).await?;
        let names: Vec<String> = nodes
            .iter()
            .filter_map(|n| n["node"].as_str().map(str::to_owned))
            .collect();
        let replies = futures::future::join_all(
            names
                .iter()
                .map(|n| async move { (n.clone(), api.call(n, "status", json!({})).await) }),
        )
        .await;
        let now = Instant::now();
        let mut rows = Vec::new();
        for (node, reply) in replies {
            let mut row = NodeRow {
                node: node.clone(),
                ..NodeRow::default()
            };
            match reply {
                Ok(s) => {
                    let checkpoint = s["checkpoint"].as_u64().unwrap_or(0);
                    let published = s["published"].as_u64().unwrap_or(0);
                    if let Some((t, c, p)) = self.previous.get(&node) {
                        let secs = now.duration_since(*t).as_secs_f64().max(1e-3);
                        row.apply_rate = Some(checkpoint.saturating_sub(*c) as f64 / secs);
                        row.publish_rate = Some(published.saturating_sub(*p) as f64 / secs);
                    }
                    self.previous.insert(node, (now, checkpoint, published));
                    row.status = Some(s);
                }
                Err(e) => row.error = Some(e.to_string()),
            }
            rows.push(row);
        }
        Ok(rows)
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

/// The columns of the table.
pub const HEADERS: [&str; 12] = [
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
    "HALTED",
];

/// The cells of one row, as text.
pub fn cells(row: &NodeRow) -> Vec<String> {
    let Some(s) = &row.status else {
        let mut v = vec![row.node.clone(), "?".into()];
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
        s["halted"]["kind"].as_str().unwrap_or("no").to_owned(),
    ]
}

fn draw(frame: &mut ratatui::Frame<'_>, rows: &[NodeRow], footer: &str) {
    let [table_area, footer_area] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(frame.area());
    let header = Row::new(HEADERS.iter().map(|h| Cell::from(*h)))
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
        Row::new(c.into_iter().map(Cell::from)).style(style)
    });
    let widths = [
        Constraint::Length(12),
        Constraint::Length(12),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Min(8),
    ];
    let table = Table::new(body, widths)
        .header(header)
        .block(Block::bordered().title(" jetsync top "));
    frame.render_widget(table, table_area);
    frame.render_widget(Paragraph::new(Line::from(footer.to_owned())), footer_area);
}

/// One frame as plain text, `width` columns wide.
pub fn render_text(rows: &[NodeRow], width: u16) -> String {
    let height = u16::try_from(rows.len())
        .unwrap_or(u16::MAX)
        .saturating_add(4);
    let Ok(mut term) = Terminal::new(TestBackend::new(width, height));
    let _ = term.draw(|f| draw(f, rows, &format!("{} nodes", rows.len())));
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
    out
}

/// Runs `jetsync top` until interrupted (or for one frame with `--once`).
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let api = ApiClient::new(args.conn.nats().await?, &args.conn.prefix);
    let interval = Duration::from_secs_f64(args.interval.max(0.1));
    let mut sampler = Sampler::default();
    if args.once {
        sampler.sample(&api).await?;
        tokio::time::sleep(interval).await;
        let rows = sampler.sample(&api).await?;
        print!("{}", render_text(&rows, 130));
        return Ok(());
    }
    interactive(&api, &mut sampler, interval).await
}

async fn interactive(
    api: &ApiClient,
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
        let (rows, footer) = match sampler.sample(api).await {
            Ok(rows) => {
                let n = rows.len();
                (rows, format!("{n} nodes · q quits"))
            }
            Err(e) => (Vec::new(), format!("{e} · q quits")),
        };
        term.draw(|f| draw(f, &rows, &footer))?;
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
