"""Generate ``finance_qa_demo.json``, the project's own finance Q&A SFT set for the CPU demo.

Every sample is written from templates with numbers drawn by a seeded RNG and answers computed
here, so the file is reproducible byte for byte (``python data/make_finance_qa_demo.py`` rewrites
it; a test checks that the committed file matches). Nothing is taken from the evaluation benchmarks.
The set is Chinese, like the paper's corpus and its three benchmarks, in alpaca format
(``system``, ``instruction``, ``input``, ``output``), and shuffled so that any prefix
(LLaMA-Factory's ``max_samples``) is a varied slice.

Kinds of samples: worked calculations (interest, discounting, loans, ratios, valuation, growth),
concept explanations from a glossary, four-option multiple-choice questions answered with one
letter, and questions about a short fictional company report, some of which the report cannot
answer (the answer then says why, as the paper's system prompt asks).
"""

import argparse
import json
import math
import os
import random

SEED = 20240820
OUTPUT_NAME = "finance_qa_demo.json"

# The paper's system prompt for FinanceIQ and fineval (arXiv 2408.10642 §4), used on the report samples.
CONTEXT_SYSTEM_PROMPT = (
    "Please answer the questions based on the context provided. Please ensure that the original "
    "information (such as numbers, time, entities, opinions, etc.) is accurately cited when answering. "
    "If the user's question cannot be answered based on the given context, please briefly explain why. "
    "If the answer involves mathematical calculations, please give priority to calling tools; if it "
    "involves numerical comparison, please give the comparison process; if it involves analysis or "
    "reasoning, please give the reasoning and analysis process"
)

GLOSSARY = {
    "市盈率": "股票价格与每股收益的比值，反映投资者为获得一元盈利愿意支付的价格",
    "市净率": "股票价格与每股净资产的比值，常用于评估银行等重资产行业的估值",
    "净资产收益率": "净利润与平均股东权益的比值，衡量公司运用自有资本获利的能力",
    "资产负债率": "负债总额与资产总额的比值，反映公司总资产中通过负债筹集的比例",
    "流动比率": "流动资产与流动负债的比值，衡量企业短期偿债能力",
    "速动比率": "流动资产扣除存货后与流动负债的比值，比流动比率更严格地衡量短期偿债能力",
    "毛利率": "营业收入减去营业成本后的毛利占营业收入的比例",
    "久期": "债券现金流的加权平均到期时间，用来衡量债券价格对利率变动的敏感程度",
    "到期收益率": "使债券未来现金流现值等于其当前价格的折现率",
    "票面利率": "债券发行时约定的每年支付利息占票面金额的比例",
    "系统性风险": "影响整个市场、无法通过分散投资消除的风险，例如利率和宏观经济变化",
    "非系统性风险": "只影响个别公司或行业、可以通过分散投资降低的风险",
    "贝塔系数": "衡量单个资产收益相对于市场整体收益波动程度的指标",
    "夏普比率": "投资组合超额收益与其收益标准差的比值，衡量承担每单位风险获得的超额回报",
    "货币时间价值": "同一笔资金在不同时间点具有不同价值，今天的一元钱比未来的一元钱更值钱",
    "通货膨胀": "一般物价水平在一定时期内持续上涨、货币购买力下降的现象",
    "存款准备金率": "中央银行要求商业银行按存款的一定比例缴存的准备金比例，是货币政策工具之一",
    "公开市场操作": "中央银行在金融市场买卖证券以调节货币供应量和利率的政策工具",
    "流动性风险": "无法以合理价格及时变现资产或获得资金以履行支付义务的风险",
    "信用风险": "交易对手未能按合同约定履行偿付义务而造成损失的风险",
    "可转换债券": "持有人可以在约定条件下按约定价格转换为发行公司股票的债券",
    "期权": "赋予持有人在约定时间以约定价格买入或卖出标的资产的权利而非义务的合约",
    "期货": "约定在未来某一时间按确定价格交割一定数量标的物的标准化合约",
    "对冲": "通过持有相反方向的头寸来降低或抵消价格波动风险的交易策略",
    "杠杆": "借入资金扩大投资规模，从而放大收益和亏损的做法",
    "分散投资": "把资金分配到多种相关性较低的资产上以降低组合整体风险的做法",
    "指数基金": "以特定市场指数的成分股为投资对象、力求复制指数表现的基金",
    "净现值": "项目未来现金流按一定折现率折现后的现值之和减去初始投资",
    "内部收益率": "使项目净现值等于零的折现率",
    "经营活动现金流": "企业日常经营业务产生的现金流入与流出的净额",
    "应收账款周转率": "营业收入与平均应收账款的比值，反映企业收回应收账款的速度",
    "存货周转率": "营业成本与平均存货的比值，反映存货的流转速度",
    "股息率": "每股年度现金股利与股票价格的比值",
    "商誉": "企业合并时购买成本超过被购买方可辨认净资产公允价值的部分",
    "资本充足率": "银行资本与风险加权资产的比率，反映银行抵御风险的能力",
    "复利": "将每期产生的利息计入本金，下一期连同本金一起计算利息的计息方式",
    "单利": "只对本金计算利息、利息不再产生利息的计息方式",
    "年金": "在一定期限内每隔相等时间收付的等额款项",
    "回购协议": "一方出售证券并约定在未来某一日期以约定价格购回的交易",
    "做市商": "持续报出买卖价格并以自有资金与投资者交易、为市场提供流动性的机构",
}

COMPANY_NAMES = [
    "华泰制造",
    "蓝海科技",
    "金川能源",
    "远航物流",
    "瑞丰食品",
    "恒信医药",
    "星河传媒",
    "宏图建材",
    "安和零售",
    "北辰电子",
    "东方纺织",
    "丰源农业",
]


def yuan(value: float) -> str:
    return f"{value:,.2f}元"


def pct(value: float, digits: int = 2) -> str:
    return f"{value * 100:.{digits}f}%"


def sample(instruction: str, output: str, system: str = "", input_text: str = "") -> dict:
    # An empty system makes LLaMA-Factory use the template's default system prompt.
    return {"system": system, "instruction": instruction, "input": input_text, "output": output}


def draw_distinct(make, rng: random.Random, count: int) -> list:
    """``count`` samples from ``make`` with pairwise different questions (a template has few combinations)."""
    rows, seen = [], set()
    for _ in range(count * 50):
        row = make(rng)
        key = (row["instruction"], row["input"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
            if len(rows) == count:
                return rows
    raise RuntimeError(f"{make.__name__} cannot produce {count} distinct questions")


# ---- worked calculations -------------------------------------------------------------------------


def compound_interest(rng: random.Random, mistake: bool = False) -> dict:
    principal = rng.choice([10000, 20000, 50000, 80000, 100000, 200000])
    rate = rng.choice([0.02, 0.025, 0.03, 0.035, 0.04, 0.05, 0.06])
    years = rng.randint(2, 10)
    factor = 1 + rate * years if mistake else (1 + rate) ** years  # mistake: simple interest in place of compound
    final = principal * factor
    return sample(
        f"本金{principal}元，年利率{pct(rate, 1)}，按年复利计息，{years}年后的本息和是多少？",
        f"复利终值公式为 FV = P × (1 + r)^n。代入 P = {principal}元，r = {pct(rate, 1)}，n = {years}：\n"
        f"FV = {principal} × (1 + {rate})^{years} = {principal} × {factor:.4f} ≈ {yuan(final)}。\n"
        f"所以{years}年后的本息和约为{yuan(final)}，其中利息约为{yuan(final - principal)}。",
    )


def simple_interest(rng: random.Random, mistake: bool = False) -> dict:
    principal = rng.choice([5000, 10000, 30000, 60000, 150000])
    rate = rng.choice([0.015, 0.0175, 0.0225, 0.0275, 0.03])
    years = rng.randint(1, 5)
    interest = principal * rate * (years + 1 if mistake else years)  # mistake: one year too many
    return sample(
        f"一笔{principal}元的{years}年期定期存款，年利率{pct(rate)}，按单利计算，到期利息是多少？",
        f"单利利息 = 本金 × 年利率 × 年数 = {principal} × {pct(rate)} × {years} = {yuan(interest)}。\n"
        f"到期可取回本息共{yuan(principal + interest)}。",
    )


def present_value(rng: random.Random, mistake: bool = False) -> dict:
    future = rng.choice([50000, 100000, 250000, 500000])
    rate = rng.choice([0.03, 0.04, 0.05, 0.06, 0.08])
    years = rng.randint(3, 15)
    value = future / (1 + rate) ** (years - 1 if mistake else years)  # mistake: one period too few
    return sample(
        f"{years}年后需要一笔{future}元的资金，若年折现率为{pct(rate, 0)}，这笔资金的现值是多少？",
        f"现值公式为 PV = FV / (1 + r)^n = {future} / (1 + {rate})^{years} = {future} / {(1 + rate) ** years:.4f}"
        f" ≈ {yuan(value)}。\n也就是说，现在按{pct(rate, 0)}的年收益率投资约{yuan(value)}，{years}年后可得到{future}元。",
    )


def loan_payment(rng: random.Random, mistake: bool = False) -> dict:
    principal = rng.choice([300000, 500000, 800000, 1000000, 1500000])
    annual = rng.choice([0.036, 0.039, 0.042, 0.049])
    years = rng.choice([10, 15, 20, 25, 30])
    monthly_rate, months = annual / 12, years * 12
    payment = principal * monthly_rate * (1 + monthly_rate) ** months / ((1 + monthly_rate) ** months - 1)
    if mistake:  # principal plus simple annual interest, spread evenly over the months
        payment = principal * (1 + annual * years) / months
    return sample(
        f"贷款{principal}元，期限{years}年，年利率{pct(annual, 1)}，采用等额本息还款，每月还款额是多少？",
        f"月利率 i = {pct(annual, 1)} / 12 = {monthly_rate:.5f}，还款期数 n = {years} × 12 = {months}。\n"
        f"等额本息月供 = P × i × (1 + i)^n / [(1 + i)^n − 1]\n"
        f"= {principal} × {monthly_rate:.5f} × {(1 + monthly_rate) ** months:.4f} / ({(1 + monthly_rate) ** months:.4f} − 1)"
        f" ≈ {yuan(payment)}。\n总还款额约为{yuan(payment * months)}，总利息约为{yuan(payment * months - principal)}。",
    )


def pe_ratio(rng: random.Random, mistake: bool = False) -> dict:
    price = rng.choice([8.5, 12.0, 18.6, 25.3, 42.0, 66.8])
    eps = rng.choice([0.4, 0.55, 0.8, 1.2, 1.6, 2.1])
    ratio = price / (2 * eps) if mistake else price / eps  # mistake: half the ratio
    return sample(
        f"某股票当前股价为{price}元，上一年度每股收益为{eps}元，它的市盈率是多少？",
        f"市盈率 = 股价 / 每股收益 = {price} / {eps} ≈ {ratio:.2f}倍。\n"
        f"这表示按当前盈利水平，投资者大约需要{ratio:.1f}年的盈利才能收回买入成本（不考虑增长）。",
    )


def dividend_yield(rng: random.Random, mistake: bool = False) -> dict:
    price = rng.choice([5.2, 9.8, 15.0, 23.5, 38.0])
    dividend = rng.choice([0.12, 0.25, 0.4, 0.6, 0.95])
    value = dividend / price / 10 if mistake else dividend / price  # mistake: the decimal point one place off
    return sample(
        f"某股票股价{price}元，每股派发年度现金股利{dividend}元，股息率是多少？",
        f"股息率 = 每股股利 / 股价 = {dividend} / {price} ≈ {pct(value)}。",
    )


def bond_current_yield(rng: random.Random, mistake: bool = False) -> dict:
    face = 100
    coupon = rng.choice([0.025, 0.03, 0.035, 0.04, 0.05])
    price = rng.choice([92.5, 96.0, 98.8, 101.2, 104.5])
    yearly = face * coupon
    below_par = (price < face) != mistake  # mistake: the comparison with the coupon rate reversed
    return sample(
        f"一只面值100元、票面利率{pct(coupon, 1)}的债券，当前市场价格为{price}元，它的当期收益率是多少？",
        f"每年利息 = 面值 × 票面利率 = 100 × {pct(coupon, 1)} = {yearly:.2f}元。\n"
        f"当期收益率 = 年利息 / 市场价格 = {yearly:.2f} / {price} ≈ {pct(yearly / price)}。\n"
        f"由于价格{'低于' if below_par else '高于'}面值，当期收益率{'高于' if below_par else '低于'}票面利率。",
    )


def yoy_growth(rng: random.Random, mistake: bool = False) -> dict:
    name = rng.choice(COMPANY_NAMES)
    last = rng.choice([12.4, 35.8, 58.2, 102.5, 240.0])
    change = rng.choice([-0.18, -0.07, 0.05, 0.12, 0.26, 0.41])
    this = round(last * (1 + change), 1)
    growth = 1 - last / this if mistake else this / last - 1  # mistake: divided by this year's figure
    trend = "增长" if growth > 0 else "下降"
    return sample(
        f"{name}去年营业收入{last}亿元，今年营业收入{this}亿元，同比增长率是多少？",
        f"同比增长率 = (本期 − 上年同期) / 上年同期 = ({this} − {last}) / {last} ≈ {pct(growth)}。\n"
        f"即营业收入同比{trend}{pct(abs(growth))}。",
    )


def real_rate(rng: random.Random, mistake: bool = False) -> dict:
    nominal = rng.choice([0.03, 0.045, 0.06, 0.08])
    inflation = rng.choice([0.01, 0.02, 0.025, 0.035])
    exact = (1 + nominal) * (1 + inflation) - 1 if mistake else (1 + nominal) / (1 + inflation) - 1  # mistake: ×
    return sample(
        f"名义利率为{pct(nominal, 1)}，通货膨胀率为{pct(inflation, 1)}，实际利率约是多少？",
        f"按费雪方程精确计算：实际利率 = (1 + 名义利率) / (1 + 通胀率) − 1 = (1 + {nominal}) / (1 + {inflation}) − 1"
        f" ≈ {pct(exact)}。\n近似计算为 {pct(nominal, 1)} − {pct(inflation, 1)} = {pct(nominal - inflation)}，与精确值接近。",
    )


def rule_of_72(rng: random.Random, mistake: bool = False) -> dict:
    rate = rng.choice([2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 18])
    exact = math.log(2) / math.log1p(rate / 100)
    subject = rng.choice(["一项投资的年化收益率", "一笔存款的年利率", "一只基金的年均回报率"])
    years = 36 / rate if mistake else 72 / rate  # mistake: half of 72
    return sample(
        f"如果{subject}为{rate}%，用72法则估算资金翻倍大约需要多少年？",
        f"72法则：翻倍年数 ≈ 72 / 年化收益率(%) = 72 / {rate} = {years:.1f}年。\n"
        f"精确值为 ln2 / ln(1 + {rate / 100}) ≈ {exact:.2f}年，估算结果与之接近。",
    )


def fx_conversion(rng: random.Random, mistake: bool = False) -> dict:
    rate = rng.choice([6.85, 7.05, 7.12, 7.24, 7.31])
    usd = rng.choice([500, 1200, 3000, 8000, 15000])
    amount = usd / rate if mistake else usd * rate  # mistake: divided by the rate
    return sample(
        f"美元兑人民币汇率为1美元兑{rate}元人民币，{usd}美元可以兑换多少人民币？",
        f"人民币金额 = 美元金额 × 汇率 = {usd} × {rate} = {yuan(amount)}（不考虑手续费和买卖价差）。",
    )


def npv(rng: random.Random, mistake: bool = False) -> dict:
    invest = rng.choice([100, 200, 300, 500])
    flows = [round(invest * rng.uniform(0.2, 0.45), 1) for _ in range(rng.randint(3, 5))]
    rate = rng.choice([0.06, 0.08, 0.1, 0.12])
    # mistake: each flow discounted one period too few
    discounted = [flow / (1 + rate) ** (t if mistake else t + 1) for t, flow in enumerate(flows)]
    value = sum(discounted) - invest
    terms = " + ".join(f"{flow}/(1+{rate})^{t + 1}" for t, flow in enumerate(flows))
    verdict = "大于零，项目可行" if value > 0 else "小于零，按该折现率项目不可行"
    return sample(
        f"某项目初始投资{invest}万元，之后{len(flows)}年每年末的现金流分别为{'、'.join(str(f) for f in flows)}万元，"
        f"折现率{pct(rate, 0)}，求该项目的净现值。",
        f"NPV = −{invest} + {terms}\n= −{invest} + {' + '.join(f'{d:.2f}' for d in discounted)}\n"
        f"≈ {value:.2f}万元。\n净现值{verdict}。",
    )


CALCULATIONS = [
    compound_interest,
    simple_interest,
    present_value,
    loan_payment,
    pe_ratio,
    dividend_yield,
    bond_current_yield,
    yoy_growth,
    real_rate,
    rule_of_72,
    fx_conversion,
    npv,
]


# ---- concepts and multiple choice ----------------------------------------------------------------

CONCEPT_QUESTIONS = ["什么是{term}？", "请解释金融术语“{term}”的含义。", "{term}指的是什么？请简要说明。"]


def concept(term: str, phrasing: str) -> dict:
    return sample(phrasing.format(term=term), f"{term}是指{GLOSSARY[term]}。")


def multiple_choice(question: str, correct: str, distractors: list, rng: random.Random) -> dict:
    options = [correct] + distractors[:3]
    rng.shuffle(options)
    answer = "ABCD"[options.index(correct)]
    listing = "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", options))
    return sample(
        f"以下是一道金融单项选择题，请从A、B、C、D中选出正确答案，只输出一个字母。\n{question}\n{listing}\n答案：",
        answer,
    )


def term_choice(rng: random.Random) -> dict:
    term = rng.choice(sorted(GLOSSARY))
    others = rng.sample([t for t in sorted(GLOSSARY) if t != term], 3)
    return multiple_choice(f"“{GLOSSARY[term]}”描述的是下列哪个概念？", term, others, rng)


def definition_choice(rng: random.Random) -> dict:
    term = rng.choice(sorted(GLOSSARY))
    others = [GLOSSARY[t] for t in rng.sample([t for t in sorted(GLOSSARY) if t != term], 3)]
    return multiple_choice(f"关于“{term}”，下列说法正确的是：", GLOSSARY[term], others, rng)


def numeric_choice(rng: random.Random) -> dict:
    principal = rng.choice([1000, 2000, 5000, 10000])
    rate = rng.choice([0.04, 0.05, 0.08, 0.1])
    years = rng.randint(2, 4)
    correct = principal * (1 + rate) ** years
    simple = principal * (1 + rate * years)
    wrong = [simple, principal * rate * years, principal * (1 + rate) ** (years + 1)]
    return multiple_choice(
        f"本金{principal}元，年利率{pct(rate, 0)}，按年复利，{years}年后的本息和约为：",
        f"{correct:.2f}元",
        [f"{w:.2f}元" for w in wrong],
        rng,
    )


# ---- questions about a fictional company report --------------------------------------------------


def company_report(rng: random.Random) -> list:
    """One fictional annual report and several questions on it; the last cannot be answered from it."""
    name = rng.choice(COMPANY_NAMES)
    year = rng.randint(2018, 2023)
    revenue = round(rng.uniform(20, 300), 1)
    cost = round(revenue * rng.uniform(0.55, 0.85), 1)
    net = round((revenue - cost) * rng.uniform(0.2, 0.5), 1)
    assets = round(revenue * rng.uniform(1.2, 2.5), 1)
    liabilities = round(assets * rng.uniform(0.3, 0.7), 1)
    current_assets = round(assets * rng.uniform(0.3, 0.5), 1)
    current_liabilities = round(liabilities * rng.uniform(0.4, 0.8), 1)
    context = (
        f"{name}{year}年年度报告摘要：全年实现营业收入{revenue}亿元，营业成本{cost}亿元，归属于母公司股东的净利润"
        f"{net}亿元。截至{year}年末，公司总资产{assets}亿元，总负债{liabilities}亿元，其中流动资产{current_assets}亿元，"
        f"流动负债{current_liabilities}亿元。"
    )
    equity = assets - liabilities
    questions = [
        (
            f"{name}{year}年的毛利率是多少？",
            (
                f"根据报告，{year}年营业收入{revenue}亿元，营业成本{cost}亿元。\n毛利率 = (营业收入 − 营业成本) / 营业收入"
                f" = ({revenue} − {cost}) / {revenue} ≈ {pct((revenue - cost) / revenue)}。"
            ),
        ),
        (
            f"{name}{year}年末的资产负债率是多少？",
            (
                f"根据报告，{year}年末总负债{liabilities}亿元，总资产{assets}亿元。\n资产负债率 = 总负债 / 总资产"
                f" = {liabilities} / {assets} ≈ {pct(liabilities / assets)}。"
            ),
        ),
        (
            f"{name}{year}年末的流动比率是多少？短期偿债能力如何？",
            (
                f"根据报告，流动资产{current_assets}亿元，流动负债{current_liabilities}亿元。\n流动比率 = "
                f"{current_assets} / {current_liabilities} ≈ {current_assets / current_liabilities:.2f}。\n"
                + (
                    "流动比率大于1，流动资产足以覆盖流动负债，短期偿债压力较小。"
                    if current_assets > current_liabilities
                    else "流动比率低于1，流动资产不足以覆盖流动负债，短期偿债压力较大。"
                )
            ),
        ),
        (
            f"{name}{year}年的净利率是多少？",
            (
                f"根据报告，净利润{net}亿元，营业收入{revenue}亿元。\n净利率 = 净利润 / 营业收入 = {net} / {revenue}"
                f" ≈ {pct(net / revenue)}。"
            ),
        ),
        (
            f"以年末净资产近似，{name}{year}年的净资产收益率约是多少？",
            (
                f"根据报告，年末净资产 = 总资产 − 总负债 = {assets} − {liabilities} = {equity:.1f}亿元，净利润{net}亿元。\n"
                f"净资产收益率 ≈ 净利润 / 净资产 = {net} / {equity:.1f} ≈ {pct(net / equity)}（用年末而非平均净资产，为近似值）。"
            ),
        ),
    ]
    unanswerable = rng.choice(
        [
            (f"{name}{year}年的研发投入是多少？", "研发投入"),
            (f"{name}{year}年末的股价是多少？", "股价"),
            (f"{name}{year}年的经营活动现金流净额是多少？", "经营活动现金流"),
            (f"{name}{year}年的员工人数是多少？", "员工人数"),
        ]
    )
    chosen = rng.sample(questions, 3)
    rows = [sample(question, answer, CONTEXT_SYSTEM_PROMPT, context) for question, answer in chosen]
    rows.append(
        sample(
            unanswerable[0],
            f"无法根据所给内容回答。报告摘要只披露了营业收入、营业成本、净利润、总资产、总负债、流动资产和流动负债，"
            f"没有提供{unanswerable[1]}的数据。",
            CONTEXT_SYSTEM_PROMPT,
            context,
        )
    )
    return rows


def build(seed: int = SEED) -> list:
    rng = random.Random(seed)
    rows = []
    for make in CALCULATIONS:
        rows.extend(draw_distinct(make, rng, 14))
    for term in sorted(GLOSSARY):
        rows.extend(concept(term, phrasing) for phrasing in rng.sample(CONCEPT_QUESTIONS, 2))
    for make in (term_choice, definition_choice, numeric_choice):
        rows.extend(draw_distinct(make, rng, 25))
    for _ in range(18):
        rows.extend(company_report(rng))
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), OUTPUT_NAME))
    args = parser.parse_args()
    write_json(build(), args.output, "samples")


def write_json(rows: list, output: str, what: str) -> None:
    """``rows`` as ``output``, whole or not at all (written to a temporary name, then renamed)."""
    staging = output + ".tmp"
    with open(staging, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(staging, output)
    print(f"wrote {len(rows)} {what} to {output}")


if __name__ == "__main__":
    main()
